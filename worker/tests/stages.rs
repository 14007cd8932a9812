//! A model split into pipeline stages scores exactly what the whole model scores: the
//! stages run the same layers on the same hidden states, and the per-batch NLLs are
//! added in the same order. Checked in-process, stage by stage, on both fixture
//! architectures; `tests/search_cli.rs` checks the same across worker processes.

use ckmerge_common::protocol::{DatasetSpec, PipelineStage};
use ckmerge_common::WindowSpec;
use ckmerge_worker::eval::{EvalOptions, Evaluator, StageOutput};
use ckmerge_worker::test_support::fixtures;

fn data() -> Vec<DatasetSpec> {
    vec![DatasetSpec::new(
        "heldout",
        vec![fixtures().join("data/heldout.txt")],
    )]
}

fn opts(stage: Option<(usize, usize)>) -> EvalOptions {
    EvalOptions {
        window: WindowSpec {
            seq_len: Some(128),
            max_tokens: Some(4096),
            batch: Some(4),
            ..Default::default()
        },
        stage: stage.map(|(index, count)| PipelineStage { index, count }),
        ..Default::default()
    }
}

#[test]
fn two_stages_give_the_nll_of_the_whole_model() {
    for arch in ["llama", "neox"] {
        let ckpts = [
            fixtures().join(arch).join("step-1250"),
            fixtures().join(arch).join("step-1500"),
        ];
        let w = [0.37f32, 0.63];
        let mut whole = Evaluator::load(&ckpts, &data(), &opts(None)).unwrap();
        whole.set_weights(&w).unwrap();
        let want = whole.score(0).unwrap();

        let mut s0 = Evaluator::load(&ckpts, &data(), &opts(Some((0, 2)))).unwrap();
        // Later stages read no data: the first stage sends each batch's tokens.
        let mut s1 = Evaluator::load(&ckpts, &[], &opts(Some((1, 2)))).unwrap();
        assert_eq!(s0.part().layers, 0..1);
        assert_eq!(s1.part().layers, 1..2);
        assert!(s0.part().first && !s0.part().last && s1.part().last);
        assert_eq!(
            s0.parameters() + s1.parameters(),
            whole.parameters(),
            "{arch}: every tensor is held by exactly one stage"
        );
        s0.set_weights(&w).unwrap();
        s1.set_weights(&w).unwrap();

        let batches = s0.batches(0);
        assert!(batches.len() > 1, "several batches, so their order matters");
        let nll: Vec<f64> = batches
            .iter()
            .map(|b| {
                let StageOutput::Hidden(h) = s0.stage_forward(b, None).unwrap() else {
                    panic!("the first of two stages passes hidden states on")
                };
                // Tokens without hidden states, or the other way round, are refused.
                assert!(s1.stage_forward(b, None).is_err());
                assert!(s0.stage_forward(b, Some(h.clone())).is_err());
                let StageOutput::Nll(n) = s1.stage_forward(b, Some(h)).unwrap() else {
                    panic!("the last stage scores")
                };
                n
            })
            .collect();
        let got = Evaluator::result(&batches, &nll, 1.0);
        assert_eq!(got.tokens, want.tokens, "{arch}");
        assert_eq!(
            got.mean_nll.to_bits(),
            want.mean_nll.to_bits(),
            "{arch}: pipeline {} vs whole model {}",
            got.mean_nll,
            want.mean_nll
        );
    }
}

/// Multiple-choice requests through two stages: the same length groups as the whole
/// model, right-padded the same way, give every request's log-likelihood and greedy flag
/// bit for bit; a malformed group is refused by name.
#[test]
fn two_stages_give_the_choice_log_likelihoods_of_the_whole_model() {
    use ckmerge_common::protocol::SetKind;
    let task = vec![DatasetSpec {
        name: "cloze".into(),
        files: vec![fixtures().join("tasks/cloze.jsonl")],
        kind: SetKind::Task,
    }];
    for arch in ["llama", "neox"] {
        let ckpts = [
            fixtures().join(arch).join("step-1250"),
            fixtures().join(arch).join("step-1500"),
        ];
        let w = [0.37f32, 0.63];
        let mut whole = Evaluator::load(&ckpts, &task, &opts(None)).unwrap();
        whole.set_weights(&w).unwrap();
        let requests = whole.datasets[0].task.take().unwrap().requests;
        let want = whole.score_choices(&requests).unwrap();

        let mut s0 = Evaluator::load(&ckpts, &task, &opts(Some((0, 2)))).unwrap();
        let mut s1 = Evaluator::load(&ckpts, &[], &opts(Some((1, 2)))).unwrap();
        s0.set_weights(&w).unwrap();
        s1.set_weights(&w).unwrap();
        let groups = s0.choice_groups(&requests);
        assert!(groups.len() > 1);
        let mut got = vec![(0.0, false); requests.len()];
        for g in &groups {
            let (b, rows) = Evaluator::choice_batch(&requests, g);
            let seq = b.seq;
            let StageOutput::Hidden(h) = s0.stage_forward_choices(&b, &rows, None).unwrap() else {
                panic!("the first of two stages passes hidden states on")
            };
            let mut short = rows.clone();
            short[0].input_len = seq + 1;
            let Err(e) = s1.stage_forward_choices(&b, &short, Some(h.clone())) else {
                panic!("a row longer than its batch is refused")
            };
            let e = e.to_string();
            assert!(e.contains("bad multiple-choice batch"), "{e}");
            let StageOutput::LogProbs(v) = s1.stage_forward_choices(&b, &rows, Some(h)).unwrap()
            else {
                panic!("the last stage scores")
            };
            for (&i, x) in g.iter().zip(v) {
                got[i] = x;
            }
        }
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert_eq!(
                (a.0.to_bits(), a.1),
                (b.0.to_bits(), b.1),
                "{arch}, request {i}: whole {a:?} vs pipeline {b:?}"
            );
        }
    }
}

/// A stage is sent rows by its head; rows longer than the model's positions (which the
/// head never sends: requests are cut to them) are refused, not computed with rotary
/// tables grown past the model.
#[test]
fn multiple_choice_rows_longer_than_the_model_are_refused() {
    use ckmerge_common::protocol::ChoiceRow;
    use ckmerge_worker::data::Batch;
    let ckpts = [
        fixtures().join("llama/step-1250"),
        fixtures().join("llama/step-1500"),
    ];
    let mut s1 = Evaluator::load(&ckpts, &[], &opts(Some((1, 2)))).unwrap();
    s1.set_weights(&[0.5, 0.5]).unwrap();
    let hidden = 64;
    for (seq, ok) in [(128, true), (129, false)] {
        let b = Batch {
            tokens: vec![5; seq],
            seq,
            scored: 0,
        };
        let rows = [ChoiceRow {
            input_len: seq,
            targets: vec![7],
        }];
        let r = s1.stage_forward_choices(&b, &rows, Some(vec![0.1; seq * hidden]));
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(e), false) => assert!(e.to_string().contains("128 positions"), "{e}"),
            (r, _) => panic!("rows of {seq}: {:?}", r.map(|_| ())),
        }
    }
}

#[test]
fn impossible_stage_splits_are_refused() {
    let ckpts = [fixtures().join("llama/step-1250")];
    for stage in [(0, 3), (2, 2), (0, 0)] {
        let e = Evaluator::load(&ckpts, &data(), &opts(Some(stage)))
            .err()
            .unwrap_or_else(|| panic!("stage {stage:?} of a 2-layer model was accepted"));
        assert!(e.to_string().contains("2 layers"), "{e}");
    }
}
