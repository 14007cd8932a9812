//! Early stopping's decision (`ckmerge_common::race`) on real per-window NLLs of the
//! fixture models: how often it stops a candidate that is not worse than the incumbent on
//! the whole set (at most `alpha`, the documented error rate), how soon it stops one that
//! is clearly worse, and that the evaluator's raced scoring agrees with the plain one.

use ckmerge_common::protocol::DatasetSpec;
use ckmerge_common::race::{self, Race};
use ckmerge_common::WindowSpec;
use ckmerge_worker::eval::{EvalOptions, Evaluator};
use ckmerge_worker::test_support::fixtures;

/// The looks' normal quantiles at alpha = 0.01 (what the coordinator sends):
/// `1 - 0.01 SPEND[k]`.
const Z: [f64; 4] = [3.090_232, 2.878_162, 2.747_781, 2.652_070];
const ALPHA: f64 = 0.01;

fn evaluator(arch: &str) -> Evaluator {
    let ckpts = [
        fixtures().join(arch).join("step-1250"),
        fixtures().join(arch).join("step-1500"),
    ];
    let data = [DatasetSpec::new(
        "heldout",
        vec![fixtures().join("data/heldout.txt")],
    )];
    let opts = EvalOptions {
        window: WindowSpec {
            seq_len: Some(64),
            ..Default::default()
        },
        ..Default::default()
    };
    Evaluator::load(&ckpts, &data, &opts).unwrap()
}

/// Per-window NLL sums at merge weight `w` on the first source, and the scored tokens.
fn windows(ev: &mut Evaluator, w: f32) -> (Vec<f64>, usize) {
    ev.set_weights(&[w, 1.0 - w]).unwrap();
    let open = Race {
        incumbent: Vec::new(),
        z: Z,
        weights: vec![1.0],
        ..Race::whole(Vec::new())
    };
    let r = ev.score_race(1, &open).unwrap();
    assert!(r.partial.is_none());
    (r.units, r.sets[0].score.tokens)
}

/// Runs the looks over `order` as a worker does; Some(windows scored) when it stops.
fn stops(cand: &[f64], inc: &[f64], tokens: usize, order: &[usize]) -> Option<usize> {
    stops_from(cand, inc, tokens, order, race::MIN_UNITS)
}

/// [`stops`] for a set whose first look needs `min` units.
fn stops_from(
    cand: &[f64],
    inc: &[f64],
    tokens: usize,
    order: &[usize],
    min: usize,
) -> Option<usize> {
    let c: Vec<f64> = order.iter().map(|&i| cand[i]).collect();
    let b: Vec<f64> = order.iter().map(|&i| inc[i]).collect();
    race::look_plan(&[(c.len(), min)])
        .into_iter()
        .map(|(n, k)| (n[0], k))
        .find(|&(n, k)| race::look(&c[..n], &b[..n], c.len(), tokens, Z[k], 0.0).is_some())
        .map(|(n, _)| n)
}

/// Whether the looks over `order` stop `cand` as clearly better than `inc` (a leader),
/// racing the incumbent with no leader yet, as a worker does.
fn stops_as_better(cand: &[f64], inc: &[f64], tokens: usize, order: &[usize]) -> bool {
    let c: Vec<f64> = order.iter().map(|&i| cand[i]).collect();
    let b: Vec<f64> = order.iter().map(|&i| inc[i]).collect();
    let units = c.len();
    race::look_points(units)
        .into_iter()
        .find_map(|(n, k)| {
            let s = [race::Stratum {
                cand: &c[..n],
                inc: &b[..n],
                units,
                tokens,
                weight: 1.0,
            }];
            race::decide(&s, None, false, Z[k], 0.0)
        })
        .is_some_and(|(p, _)| p.better)
}

#[test]
fn a_candidate_no_worse_is_stopped_at_most_one_and_a_half_alpha() {
    for arch in ["llama", "neox"] {
        let mut ev = evaluator(arch);
        let (inc, tokens) = windows(&mut ev, 0.5);
        for other in [0.4, 0.55, 0.6, 0.7] {
            let (near, _) = windows(&mut ev, other);
            // A candidate exactly as good as the incumbent on the whole set, with the real
            // windows' spread of differences: the paired differences of a nearby merge,
            // centred. This is the hardest case the error rate is stated for.
            let d: Vec<f64> = near.iter().zip(&inc).map(|(a, b)| a - b).collect();
            let mean = d.iter().sum::<f64>() / d.len() as f64;
            let equal: Vec<f64> = inc.iter().zip(&d).map(|(b, x)| b + x - mean).collect();
            let trials = 4000u64;
            let wrong = (0..trials)
                .filter(|&s| {
                    stops(&equal, &inc, tokens, &race::permutation(inc.len(), s)).is_some()
                })
                .count();
            let rate = wrong as f64 / trials as f64;
            // Measured: 0.5 % to 1.3 % at alpha = 1 % (the normal approximation at the
            // first looks, on skewed per-window differences). The bound stated in the
            // README is 1.5 alpha; 4000 runs estimate a rate of 1 % within about 0.16 %.
            assert!(
                rate <= 1.5 * ALPHA,
                "{arch}, merge {other}: {wrong} of {trials} stopped"
            );
            // The same candidate stopped as clearly better (a wrong leader): the mirror
            // of the test above, on differences skewed the other way. Measured: 0.68 %
            // to 1.48 % at alpha = 1 %, the highest where the worse side was lowest
            // (llama, merge 0.4). The stated bound is 2 alpha: a wrong leader costs
            // tokens (later trials race a worse reference; its confirmation scores it
            // whole), never the best found, so it gets no tighter split of alpha.
            let leaders = (0..trials)
                .filter(|&s| {
                    stops_as_better(&equal, &inc, tokens, &race::permutation(inc.len(), s))
                })
                .count();
            assert!(
                leaders as f64 / trials as f64 <= 2.0 * ALPHA,
                "{arch}, merge {other}: {leaders} of {trials} stopped as better"
            );
        }
        // A source alone, clearly worse than the incumbent (several % in perplexity), is
        // stopped in nearly every order, mostly at the first look.
        let (worse, _) = windows(&mut ev, 1.0);
        let whole: f64 = (worse.iter().sum::<f64>() - inc.iter().sum::<f64>()) / tokens as f64;
        assert!(
            whole > 0.02,
            "{arch}: the source is not clearly worse ({whole})"
        );
        let first = race::look_points(inc.len())[0].0;
        let at: Vec<Option<usize>> = (0..200)
            .map(|s| stops(&worse, &inc, tokens, &race::permutation(inc.len(), s)))
            .collect();
        let stopped = at.iter().filter(|a| a.is_some()).count();
        let at_first = at.iter().filter(|a| **a == Some(first)).count();
        assert!(
            stopped >= 195 && at_first >= 150,
            "{arch}: stopped {stopped}/200, {at_first} at the first look ({first} of {} windows)",
            inc.len()
        );
    }
}

#[test]
fn raced_scoring_stops_with_an_estimate_and_agrees_with_plain_scoring() {
    let mut ev = evaluator("llama");
    ev.shuffle_units(0, 11);
    let (inc, tokens) = windows(&mut ev, 0.5);
    // Scored whole, the per-window sums add up to the plain score.
    let plain = ev.score(0).unwrap();
    assert_eq!(plain.tokens, tokens);
    let total = inc.iter().sum::<f64>() / tokens as f64;
    assert!(
        (total - plain.mean_nll).abs() < 1e-9,
        "{total} vs {}",
        plain.mean_nll
    );
    // A clearly worse candidate stops at a look, with fewer tokens scored and the
    // estimate of its whole-set value near the truth.
    ev.set_weights(&[1.0, 0.0]).unwrap();
    let truth = ev.score(0).unwrap().mean_nll;
    let race = Race {
        incumbent: inc.clone(),
        z: Z,
        weights: vec![1.0],
        ..Race::whole(Vec::new())
    };
    let raced = ev.score_race(1, &race).unwrap();
    let (r, units) = (&raced.sets[0].score, raced.units);
    let p = raced.partial.expect("stopped");
    assert_eq!(units.len(), p.scored_units);
    assert!(race::look_points(inc.len())
        .iter()
        .any(|l| l.0 == p.scored_units));
    assert!(r.tokens < tokens / 2, "{} of {tokens}", r.tokens);
    assert!(p.lower_bound > 0.0);
    assert!(
        (r.mean_nll - truth).abs() < 4.0 * p.std_error,
        "estimate {} vs {truth} (se {})",
        r.mean_nll,
        p.std_error
    );
    // The incumbent against itself is never stopped; a wrong-sized incumbent is refused.
    ev.set_weights(&[0.5, 0.5]).unwrap();
    assert!(ev.score_race(1, &race).unwrap().partial.is_none());
    let bad = Race {
        incumbent: inc[1..].to_vec(),
        ..race
    };
    let e = ev.score_race(1, &bad).unwrap_err().to_string();
    assert!(e.contains("units where this objective has"), "{e}");
}

/// Leaders: against a clearly worse incumbent (a source alone), a candidate stops as
/// better with its estimate against the incumbent and its scored windows, which later
/// trials are sent as the leader's. A candidate as good as the leader is never shown
/// better than it, and beyond the leader's windows cannot be, so it is scored whole; one
/// clearly worse than the leader stops against it though better than the incumbent.
#[test]
fn a_clearly_better_trial_stops_as_the_leader_and_later_trials_race_it() {
    let mut ev = evaluator("llama");
    ev.shuffle_units(0, 5);
    let (src, tokens) = windows(&mut ev, 1.0);
    ev.set_weights(&[0.5, 0.5]).unwrap();
    let truth = ev.score(0).unwrap().mean_nll;
    let open = |incumbent: Vec<f64>, leader: Vec<f64>, leader_scored: Vec<usize>| Race {
        incumbent,
        z: Z,
        weights: vec![1.0],
        margin: 0.0,
        leader,
        leader_scored,
        ..Race::whole(Vec::new())
    };
    let raced = ev
        .score_race(1, &open(src.clone(), vec![], vec![]))
        .unwrap();
    let p = raced.partial.clone().expect("stopped as better");
    assert!(
        p.better && !p.against_leader && p.upper_bound < 0.0,
        "{p:?}"
    );
    assert_eq!(p.scored, vec![p.scored_units]);
    assert_eq!(raced.units.len(), p.scored_units);
    assert!(raced.sets[0].score.tokens < tokens / 2);
    let est = raced.sets[0].score.mean_nll;
    assert!(
        (est - truth).abs() < 4.0 * p.std_error,
        "estimate {est} vs {truth} (se {})",
        p.std_error
    );
    let src_mean = src.iter().sum::<f64>() / tokens as f64;
    assert!(
        (est - src_mean - p.difference).abs() < 1e-9,
        "against the incumbent"
    );

    // The leader's own weights: never better than itself, so scored whole.
    let with_leader = open(src.clone(), raced.units.clone(), p.scored.clone());
    let again = ev.score_race(1, &with_leader).unwrap();
    assert!(again.partial.is_none(), "{:?}", again.partial);
    assert_eq!(again.sets[0].score.tokens, tokens);
    // Scored whole after racing the leader, a trial tells how it compares with it on the
    // leader's windows (the expansion estimate of the difference, paired): for the
    // leader's own weights, nothing; for a trial next to it, its windows' differences.
    let v = again.versus_leader.expect("raced a leader");
    assert_eq!((v.difference, v.std_error), (0.0, 0.0));
    ev.set_weights(&[0.47, 0.53]).unwrap();
    let near = ev.score_race(1, &with_leader).unwrap();
    assert!(near.partial.is_none(), "{:?}", near.partial);
    let n = p.scored_units;
    let d: Vec<f64> = (0..n).map(|i| near.units[i] - raced.units[i]).collect();
    let expected = src.len() as f64 / tokens as f64 * d.iter().sum::<f64>() / n as f64;
    let v = near.versus_leader.expect("raced a leader");
    assert!(
        (v.difference - expected).abs() < 1e-12,
        "{v:?} vs {expected}"
    );
    assert!(v.std_error > 0.0);
    // The upper bound at the last look's quantile, as a look would take it.
    let e = race::estimate(&[race::Stratum {
        cand: &near.units[..n],
        inc: &raced.units,
        units: src.len(),
        tokens,
        weight: 1.0,
    }])
    .unwrap();
    assert_eq!(v.upper_bound, e.bounds(Z[3]).1);
    // No leader, nothing to compare.
    assert!(ev
        .score_race(1, &Race::whole(vec![1.0]))
        .unwrap()
        .versus_leader
        .is_none());
    // A merge between the source and the leader: better than the incumbent, clearly worse
    // than the leader, stopped against the leader.
    ev.set_weights(&[0.85, 0.15]).unwrap();
    let mid = ev.score_race(1, &with_leader).unwrap();
    let q = mid.partial.expect("stopped against the leader");
    assert!(
        !q.better && q.against_leader && q.lower_bound > 0.0,
        "{q:?}"
    );
    assert!(q.difference < 0.0, "better than the incumbent: {q:?}");
    assert!(q.scored_units <= p.scored_units);

    // The leader's confirmation goes on from its windows: the same units and value as the
    // leader's weights scored whole, bit for bit, having scored only the rest.
    ev.set_weights(&[0.5, 0.5]).unwrap();
    let cont = Race {
        own: raced.units.clone(),
        own_scored: p.scored.clone(),
        ..Race::whole(vec![1.0])
    };
    let whole = ev.score_race(1, &cont).unwrap();
    assert!(whole.partial.is_none());
    assert_eq!(whole.units, again.units);
    assert_eq!(whole.sets[0].score, again.sets[0].score);
    // It must be scored whole, and its units must fit.
    let raced_too = Race {
        incumbent: src.clone(),
        ..cont.clone()
    };
    let e = ev.score_race(1, &raced_too).unwrap_err().to_string();
    assert!(e.contains("a continued trial has"), "{e}");

    // A leader whose units do not fit the objective is refused.
    let bad = open(src.clone(), raced.units[1..].to_vec(), p.scored.clone());
    let e = ev.score_race(1, &bad).unwrap_err().to_string();
    assert!(e.contains("the leader has"), "{e}");
}

/// A task's units are its items (each item's choice NLL), and a mixture of a task and a
/// text races both at once: scored whole, the units reproduce the plain scores; a clearly
/// worse candidate stops at a look with an estimate of the mixture near its true value,
/// fewer windows scored (the small fixture task is scored whole before the first look).
#[test]
fn a_task_and_a_mixture_race_item_by_item_and_window_by_window() {
    let ckpts = [
        fixtures().join("llama/step-1250"),
        fixtures().join("llama/step-1500"),
    ];
    let data = [
        DatasetSpec::task("cloze", fixtures().join("tasks/cloze.jsonl")),
        DatasetSpec::new("heldout", vec![fixtures().join("data/heldout.txt")]),
    ];
    let opts = EvalOptions {
        window: WindowSpec {
            seq_len: Some(64),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut ev = Evaluator::load(&ckpts, &data, &opts).unwrap();
    ev.shuffle_units(0, race::set_seed(3, 0));
    ev.shuffle_units(1, race::set_seed(3, 1));
    ev.set_weights(&[0.5, 0.5]).unwrap();
    let task = ev.score_set(0).unwrap().score;
    let text = ev.score(1).unwrap();

    // The task alone, scored whole: one unit per item, their mean the task's choice NLL.
    let open = |weights: Vec<f64>| Race {
        incumbent: Vec::new(),
        z: Z,
        weights,
        ..Race::whole(Vec::new())
    };
    let r = ev.score_race(1, &open(vec![1.0])).unwrap();
    let items = task.task.unwrap().items;
    assert_eq!(r.units.len(), items);
    let mean = r.units.iter().sum::<f64>() / items as f64;
    assert!(
        (mean - task.mean_nll).abs() < 1e-9,
        "{mean} vs {}",
        task.mean_nll
    );
    assert!((r.sets[0].score.mean_nll - task.mean_nll).abs() < 1e-9);
    assert_eq!(r.sets[0].score.task, task.task);

    // The mixture, scored whole: the task's items, then the text's windows.
    let w = vec![0.25, 0.75];
    let inc = ev.score_race(2, &open(w.clone())).unwrap();
    assert!(inc.partial.is_none());
    let windows = inc.units.len() - items;
    // A trial cannot go on from a task's items without their choices' results.
    let cont = Race {
        own: inc.units[..items].to_vec(),
        own_scored: vec![items, 0],
        ..Race::whole(w.clone())
    };
    let e = ev.score_race(2, &cont).unwrap_err().to_string();
    assert!(
        e.contains("too few for the items it scored of set 0"),
        "{e}"
    );
    let text_mean = inc.units[items..].iter().sum::<f64>() / text.tokens as f64;
    assert!((text_mean - text.mean_nll).abs() < 1e-9);
    let value = |sets: &[ckmerge_worker::eval::SetResult]| {
        w[0] * sets[0].score.mean_nll + w[1] * sets[1].score.mean_nll
    };

    // A source alone: worse on the mixture, stopped with an estimate near the truth.
    ev.set_weights(&[1.0, 0.0]).unwrap();
    let truth =
        w[0] * ev.score_set(0).unwrap().score.mean_nll + w[1] * ev.score(1).unwrap().mean_nll;
    assert!(
        truth > value(&inc.sets) + 0.01,
        "{truth} vs {}",
        value(&inc.sets)
    );
    let race = Race {
        incumbent: inc.units.clone(),
        z: Z,
        weights: w.clone(),
        ..Race::whole(Vec::new())
    };
    let raced = ev.score_race(2, &race).unwrap();
    let p = raced.partial.expect("stopped");
    let plan = race::look_plan(&[(items, race::MIN_ITEMS), (windows, race::MIN_UNITS)]);
    assert!(plan
        .iter()
        .any(|(n, _)| n.iter().sum::<usize>() == p.scored_units));
    assert_eq!(raced.units.len(), p.scored_units);
    assert_eq!(p.units, items + windows);
    // 48 items are fewer than a task's looks need (race::MIN_ITEMS): the task is scored
    // whole at the first look, exactly known; the text is sampled.
    assert_eq!(raced.sets[0].score.task.unwrap().items, items);
    assert!(raced.sets[1].score.tokens < text.tokens);
    let estimate = value(&raced.sets);
    assert!(
        (estimate - value(&inc.sets) - p.difference).abs() < 1e-9,
        "the estimate is the incumbent's value plus the difference"
    );
    assert!(
        (estimate - truth).abs() < 4.0 * p.std_error,
        "estimate {estimate} vs {truth} (se {})",
        p.std_error
    );
    // The incumbent against itself is not stopped.
    ev.set_weights(&[0.5, 0.5]).unwrap();
    assert!(ev.score_race(2, &race).unwrap().partial.is_none());

    // Raced against the source alone, the same weights stop as the leader, keeping the
    // task's choice results with its units; its confirmation goes on from them and gives
    // the whole scoring's units and scores (accuracies included), bit for bit.
    let worse = Race {
        incumbent: raced_whole(&mut ev, [1.0, 0.0], &w),
        ..race.clone()
    };
    ev.set_weights(&[0.5, 0.5]).unwrap();
    let lead = ev.score_race(2, &worse).unwrap();
    let p = lead.partial.expect("stopped as better");
    assert!(p.better, "{p:?}");
    assert_eq!(
        p.choices.len(),
        ev.datasets[0].task.as_ref().unwrap().requests.len()
    );
    let cont = Race {
        own: lead.units.clone(),
        own_scored: p.scored.clone(),
        own_choices: p.choices.clone(),
        ..Race::whole(w.clone())
    };
    let whole = ev.score_race(2, &cont).unwrap();
    assert!(whole.partial.is_none());
    assert_eq!(whole.units, inc.units);
    let scores = |r: &ckmerge_worker::eval::Raced| -> Vec<_> {
        r.sets.iter().map(|s| s.score.clone()).collect()
    };
    assert_eq!(scores(&whole), scores(&inc));

    // A trial scored whole after racing the leader compares with it set by set, each on
    // the leader's units of that set (the task's every item, the text's first windows):
    // the sets' weighted expansion estimates. (Bounds too wide to stop at any look: the
    // task scored whole makes the paired test sharp enough to stop a trial this close.)
    let with_leader = Race {
        leader: lead.units.clone(),
        leader_scored: p.scored.clone(),
        z: [50.0; 4],
        ..worse.clone()
    };
    ev.set_weights(&[0.47, 0.53]).unwrap();
    let near = ev.score_race(2, &with_leader).unwrap();
    assert!(near.partial.is_none(), "{:?}", near.partial);
    let (l_items, l_windows) = (p.scored[0], p.scored[1]);
    assert_eq!(
        l_items, items,
        "the small task is scored whole at every look"
    );
    assert!(l_windows < windows);
    let mean_diff =
        |c: &[f64], l: &[f64]| c.iter().zip(l).map(|(c, l)| c - l).sum::<f64>() / l.len() as f64;
    let expected = w[0] * mean_diff(&near.units[..items], &lead.units[..items])
        + w[1] * windows as f64 / text.tokens as f64
            * mean_diff(&near.units[items..items + l_windows], &lead.units[items..]);
    let v = near.versus_leader.expect("raced a leader");
    assert!(
        (v.difference - expected).abs() < 1e-12,
        "{v:?} vs {expected}"
    );
}

/// The objective's units of `weights` scored whole (raced with no incumbent).
fn raced_whole(ev: &mut Evaluator, weights: [f32; 2], w: &[f64]) -> Vec<f64> {
    ev.set_weights(&weights).unwrap();
    let r = ev.score_race(w.len(), &Race::whole(w.to_vec())).unwrap();
    assert!(r.partial.is_none());
    r.units
}

/// The error rate on a task's items (each item's choice NLL a unit: heavier-tailed than
/// a window's sum), measured as for text: a candidate exactly as good as the incumbent on
/// the whole task, with the real items' spread of differences, over 4000 item orders, on
/// the 400-item task (tests/fixtures/trajectory/tasks/cloze-large.jsonl). On the 48-item
/// fixture task, looks at 12 and 24 items stopped up to 1.6 % of them: hence
/// `race::MIN_ITEMS`, under which a task that small is scored whole.
#[test]
fn a_candidate_no_worse_on_a_task_is_stopped_at_most_one_and_a_half_alpha() {
    for arch in ["llama", "neox"] {
        let ckpts = [
            fixtures().join(arch).join("step-1250"),
            fixtures().join(arch).join("step-1500"),
        ];
        let data = [DatasetSpec::task(
            "cloze-large",
            fixtures().join("tasks/cloze-large.jsonl"),
        )];
        let mut ev = Evaluator::load(&ckpts, &data, &EvalOptions::default()).unwrap();
        let mut units = |w: f32| {
            ev.set_weights(&[w, 1.0 - w]).unwrap();
            let open = Race {
                incumbent: Vec::new(),
                z: Z,
                weights: vec![1.0],
                ..Race::whole(Vec::new())
            };
            ev.score_race(1, &open).unwrap().units
        };
        let inc = units(0.5);
        let n = inc.len();
        assert!(race::look_plan(&[(48, race::MIN_ITEMS)]).is_empty());
        for other in [0.0, 0.3, 0.7, 1.0] {
            let near = units(other);
            let d: Vec<f64> = near.iter().zip(&inc).map(|(a, b)| a - b).collect();
            let mean = d.iter().sum::<f64>() / n as f64;
            let equal: Vec<f64> = inc.iter().zip(&d).map(|(b, x)| b + x - mean).collect();
            let trials = 4000u64;
            let wrong = (0..trials)
                .filter(|&s| {
                    let order = race::permutation(n, s);
                    stops_from(&equal, &inc, n, &order, race::MIN_ITEMS).is_some()
                })
                .count();
            // Measured: 0.3 % to 0.7 % at alpha = 1 %.
            assert!(
                wrong as f64 / trials as f64 <= 1.5 * ALPHA,
                "{arch}, merge {other}: {wrong} of {trials} stopped"
            );
        }
    }
}
