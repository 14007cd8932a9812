//! Held-out perplexity against transformers: every checkpoint of the committed training
//! trajectories (tests/fixtures/trajectory, a Llama and a GPT-NeoX) and every golden merge
//! of adjacent checkpoints must give the mean NLL that transformers computed
//! (scripts/fixtures/make_trajectory.py) within 1e-4 relative, through the in-memory
//! merge-and-evaluate API; plus the invariances the search relies on. The errors of
//! `ckmerge eval` are tested with the binary, in tests/eval_golden.rs.

use std::path::PathBuf;

use ckmerge_common::protocol::DatasetSpec;
use ckmerge_common::WindowSpec;
use ckmerge_worker::eval::{EvalOptions, Evaluator};
use ckmerge_worker::test_support::{check, fixtures as root, golden};

fn data_sets() -> Vec<DatasetSpec> {
    ["heldout", "python-docs"]
        .iter()
        .map(|n| DatasetSpec::new(*n, vec![root().join(format!("data/{n}.txt"))]))
        .collect()
}

fn golden_arch(arch: &str) {
    let g = golden();
    let gm = &g["models"][arch];
    let mut steps: Vec<String> = gm["checkpoints"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    steps.sort_by_key(|s| s.trim_start_matches("step-").parse::<u32>().unwrap());
    assert_eq!(steps.len(), 6);
    let dirs: Vec<PathBuf> = steps.iter().map(|s| root().join(arch).join(s)).collect();
    let mut ev = Evaluator::load(&dirs, &data_sets(), &EvalOptions::default()).unwrap();
    assert_eq!(ev.seq_len, g["eval_seq_len"].as_u64().unwrap() as usize);

    for (i, s) in steps.iter().enumerate() {
        let mut w = vec![0f32; steps.len()];
        w[i] = 1.0;
        ev.set_weights(&w).unwrap();
        for (d, name) in ["heldout", "python-docs"].iter().enumerate() {
            let r = ev.score(d).unwrap();
            let want = &gm["checkpoints"][s][name];
            assert_eq!(
                r.tokens as u64,
                want["tokens"].as_u64().unwrap(),
                "{arch} {s} {name}: tokens scored"
            );
            check(
                &format!("{arch} {s} {name}"),
                r.mean_nll,
                want["mean_nll"].as_f64().unwrap(),
            );
        }
    }
    let mut best_merge = f64::INFINITY;
    for m in gm["merges"].as_array().unwrap() {
        let (prev, cur, lam) = (
            m["prev"].as_str().unwrap(),
            m["cur"].as_str().unwrap(),
            m["lambda"].as_f64().unwrap(),
        );
        let mut w = vec![0f32; steps.len()];
        let lw = ckmerge_kernels::merge::lerp_weights(lam);
        w[steps.iter().position(|s| s == prev).unwrap()] = lw[0];
        w[steps.iter().position(|s| s == cur).unwrap()] = lw[1];
        let r = ev.evaluate(&w).unwrap();
        check(
            &format!("{arch} {prev}..{cur} lambda {lam}"),
            r.mean_nll,
            m["heldout"]["mean_nll"].as_f64().unwrap(),
        );
        if cur == steps[5] {
            best_merge = best_merge.min(r.mean_nll);
        }
    }
    // What the product exists for: a merge of the last two checkpoints beats both.
    let end = |s: &str| {
        gm["checkpoints"][s]["heldout"]["mean_nll"]
            .as_f64()
            .unwrap()
    };
    assert!(
        best_merge < end(&steps[4]).min(end(&steps[5])),
        "{arch}: no merge beats both ends"
    );
}

#[test]
fn llama_matches_transformers_on_every_checkpoint_and_merge() {
    golden_arch("llama");
}

#[test]
fn gpt_neox_matches_transformers_on_every_checkpoint_and_merge() {
    golden_arch("neox");
}

#[test]
fn strided_windows_match_transformers() {
    let g = golden();
    for arch in ["llama", "neox"] {
        let dir = root().join(arch).join("step-1500");
        let opts = EvalOptions {
            window: WindowSpec {
                stride: Some(64),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut ev = Evaluator::load(&[dir], &data_sets()[..1], &opts).unwrap();
        let r = ev.evaluate(&[1.0]).unwrap();
        let want = &g["models"][arch]["checkpoints"]["step-1500"]["heldout_stride_64"];
        assert_eq!(r.tokens as u64, want["tokens"].as_u64().unwrap());
        check(
            &format!("{arch} stride 64"),
            r.mean_nll,
            want["mean_nll"].as_f64().unwrap(),
        );
    }
}

#[test]
fn batch_size_and_threads_do_not_change_the_result() {
    let dirs = [
        root().join("llama/step-1250"),
        root().join("llama/step-1500"),
    ];
    let score = |batch: usize, threads: usize| {
        let opts = EvalOptions {
            window: WindowSpec {
                batch: Some(batch),
                max_tokens: Some(6000),
                ..Default::default()
            },
            ..Default::default()
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut ev = Evaluator::load(&dirs, &data_sets()[..1], &opts).unwrap();
            ev.evaluate(&[0.4, 0.6]).unwrap().mean_nll
        })
    };
    let reference = score(1, 1);
    for (batch, threads) in [(8, 1), (3, 2), (46, 2)] {
        let got = score(batch, threads);
        let rel = (got - reference).abs() / reference;
        assert!(
            rel < 1e-6,
            "batch {batch}, {threads} threads: {got} vs {reference} (batch 1, 1 thread): {rel:e}"
        );
    }
}

#[test]
fn config_variants_match_transformers() {
    // Untrained one-layer models with every parameter random (biases and norms too), for
    // the config paths the trajectories do not exercise: Qwen2's q/k/v bias, tied
    // embeddings, llama3 and linear RoPE scaling, attention and MLP biases, Mistral.
    let g = golden();
    let v = &g["variants"];
    let max_tokens = v["max_tokens"].as_u64().unwrap() as usize;
    let models = v["models"].as_object().unwrap();
    assert_eq!(models.len(), 4);
    for (name, want) in models {
        let dir = root().join("variants").join(name);
        let opts = EvalOptions {
            window: WindowSpec {
                max_tokens: Some(max_tokens),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut ev = Evaluator::load(&[dir], &data_sets()[..1], &opts).unwrap();
        assert_eq!(ev.seq_len, v["seq_len"].as_u64().unwrap() as usize);
        let r = ev.evaluate(&[1.0]).unwrap();
        assert_eq!(
            r.tokens as u64,
            want["tokens"].as_u64().unwrap(),
            "{name}: tokens scored"
        );
        check(name, r.mean_nll, want["mean_nll"].as_f64().unwrap());
    }
}

/// The architectures added for published trajectories (issue 15), each as two untrained
/// two-layer checkpoints written by transformers (scripts/fixtures/make_architectures.py):
/// each checkpoint and their 0.5/0.5 merge against transformers' mean NLL.
fn architecture_matches_transformers(name: &str) {
    let dir = root().join("architectures");
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("architectures.json")).unwrap()).unwrap();
    let want = &g["models"][name];
    let opts = EvalOptions {
        window: WindowSpec {
            seq_len: Some(g["seq_len"].as_u64().unwrap() as usize),
            max_tokens: Some(g["max_tokens"].as_u64().unwrap() as usize),
            ..Default::default()
        },
        ..Default::default()
    };
    let sources = [dir.join(name).join("a"), dir.join(name).join("b")];
    let mut ev = Evaluator::load(&sources, &data_sets()[..1], &opts).unwrap();
    for (weights, key) in [
        ([1.0, 0.0], "a"),
        ([0.0, 1.0], "b"),
        ([0.5, 0.5], "merge_0.5"),
    ] {
        let r = ev.evaluate(&weights).unwrap();
        assert_eq!(
            r.tokens as u64,
            want[key]["tokens"].as_u64().unwrap(),
            "{name} {key}: tokens scored"
        );
        check(
            &format!("{name} {key}"),
            r.mean_nll,
            want[key]["mean_nll"].as_f64().unwrap(),
        );
    }
    // The merged model `ckmerge merge` wrote, loaded back by transformers, scored as the
    // golden merge (recorded by the fixture script; Baichuan has no transformers class).
    let loaded = &want["merge_0.5"]["written_by_ckmerge_loaded_in_transformers"];
    if !name.starts_with("baichuan") {
        check(
            &format!("{name}: ckmerge's merged output in transformers"),
            loaded
                .as_f64()
                .expect("recorded by make_architectures.py --ckmerge"),
            want["merge_0.5"]["mean_nll"].as_f64().unwrap(),
        );
    }
}

#[test]
fn olmo_matches_transformers() {
    architecture_matches_transformers("olmo");
}

#[test]
fn olmo2_matches_transformers() {
    architecture_matches_transformers("olmo2");
}

#[test]
fn smollm3_matches_transformers() {
    architecture_matches_transformers("smollm3");
}

#[test]
fn baichuan2_matches_the_equivalent_llama_in_transformers() {
    architecture_matches_transformers("baichuan");
}

/// Baichuan 13B's design (ALiBi): no transformers class computes it; the golden is the
/// fixture script's PyTorch transcription of Baichuan's code, itself checked against
/// transformers on the RoPE design.
#[test]
fn baichuan_alibi_matches_the_pytorch_reference() {
    architecture_matches_transformers("baichuan-alibi");
}

#[test]
fn qwen3_matches_transformers() {
    architecture_matches_transformers("qwen3");
}

#[test]
fn per_group_weights_reach_the_evaluator() {
    use ckmerge_common::{Grouping, MergeWeights};
    let patterns = ["embeddings", "lm_head", "norms", "attention", "mlp"].map(String::from);
    let dirs = [
        root().join("llama/step-1250"),
        root().join("llama/step-1500"),
    ];
    let opts = EvalOptions {
        window: WindowSpec {
            max_tokens: Some(4000),
            ..Default::default()
        },
        groups: Some(Grouping::parse(&patterns).unwrap()),
        ..Default::default()
    };
    let mut ev = Evaluator::load(&dirs, &data_sets()[..1], &opts).unwrap();
    // The same weights in every group is the plain merge.
    ev.set_weights(&[0.3, 0.7]).unwrap();
    let plain = ev.score(0).unwrap().mean_nll;
    ev.merge(&MergeWeights::per_group(vec![vec![0.3, 0.7]; 5]))
        .unwrap();
    assert_eq!(ev.score(0).unwrap().mean_nll, plain);
    // Different weights per group give a different model, and set_weights still resets it.
    ev.merge(&MergeWeights::per_group(vec![
        vec![1.0, 0.0],
        vec![1.0, 0.0],
        vec![0.3, 0.7],
        vec![0.0, 1.0],
        vec![0.5, 0.5],
    ]))
    .unwrap();
    let grouped = ev.score(0).unwrap().mean_nll;
    assert!((grouped - plain).abs() > 1e-4, "{grouped} vs {plain}");
    ev.set_weights(&[0.3, 0.7]).unwrap();
    assert_eq!(ev.score(0).unwrap().mean_nll, plain);
}

#[test]
fn repeated_scores_are_bit_identical() {
    // Regression: the same data scored by two `ckmerge eval` runs differed in the last bit
    // once in CI (3.530258246951884 vs ...885). The likely cause, rayon's parallel `sum`
    // of the per-row NLLs (its association depends on scheduling), is now a sequential
    // sum; this did not reproduce locally, so this test guards the property, not the bug.
    let dirs = [root().join("neox/step-1250"), root().join("neox/step-1500")];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let opts = EvalOptions {
            window: WindowSpec {
                batch: Some(3),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut ev = Evaluator::load(&dirs, &data_sets(), &opts).unwrap();
        ev.set_weights(&[0.5, 0.5]).unwrap();
        let first: Vec<u64> = (0..2)
            .map(|d| ev.score(d).unwrap().mean_nll.to_bits())
            .collect();
        for _ in 0..6 {
            let again: Vec<u64> = (0..2)
                .map(|d| ev.score(d).unwrap().mean_nll.to_bits())
                .collect();
            assert_eq!(again, first);
        }
    });
}
