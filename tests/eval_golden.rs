//! Held-out perplexity against transformers: every checkpoint of the committed training
//! trajectories (tests/fixtures/trajectory, a Llama and a GPT-NeoX) and every golden merge
//! of adjacent checkpoints must give the mean NLL that transformers computed
//! (scripts/fixtures/make_trajectory.py) within 1e-4 relative, through the in-memory
//! merge-and-evaluate API. Plus the invariances the search relies on, and the errors of
//! `ckmerge eval`.

use std::path::{Path, PathBuf};
use std::process::Command;

use ckmerge_common::WindowSpec;
use ckmerge_worker::eval::{EvalOptions, Evaluator};
use serde_json::Value;

const RTOL: f64 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trajectory")
}

fn golden() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("golden.json")).unwrap()).unwrap()
}

fn data_sets() -> Vec<(String, Vec<PathBuf>)> {
    ["heldout", "python-docs"]
        .iter()
        .map(|n| (n.to_string(), vec![root().join(format!("data/{n}.txt"))]))
        .collect()
}

fn check(what: &str, got: f64, want: f64) {
    let rel = (got - want).abs() / want.abs();
    assert!(
        rel <= RTOL,
        "{what}: transformers {want:.8}, ckmerge {got:.8} (relative error {rel:.2e} > {RTOL:e})"
    );
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

fn ckmerge_eval(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckmerge"));
    cmd.arg("eval");
    for a in args {
        cmd.arg(a);
    }
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn copy_ckpt(tmp: &Path) -> PathBuf {
    let dst = tmp.join("ckpt");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(root().join("llama/step-1500")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = dir.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(c.as_object_mut().unwrap());
    std::fs::write(p, serde_json::to_vec(&c).unwrap()).unwrap();
}

#[test]
fn cli_json_output_and_weights() {
    let heldout = root().join("data/heldout.txt");
    let (ok, out, err) = ckmerge_eval(&[
        &root().join("llama/step-1250"),
        &root().join("llama/step-1500"),
        &"--lambda",
        &"0.5",
        &"--data",
        &heldout,
        &"--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let want = golden()["models"]["llama"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["cur"] == "step-1500" && m["lambda"] == 0.5)
        .unwrap()["heldout"]["mean_nll"]
        .as_f64()
        .unwrap();
    check(
        "cli lambda 0.5",
        v["datasets"][0]["mean_nll"].as_f64().unwrap(),
        want,
    );
    let (ok, _, err) = ckmerge_eval(&[
        &root().join("llama/step-1250"),
        &root().join("llama/step-1500"),
        &"--data",
        &heldout,
    ]);
    assert!(!ok && err.contains("need --weights"), "{err}");
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_ckpt(tmp.path());
    edit_config(&ck, |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["MambaForCausalLM"]),
        );
    });
    let (ok, _, err) = ckmerge_eval(&[&ck, &"--data", &root().join("data/heldout.txt")]);
    assert!(!ok);
    for needle in [
        "config.json",
        "MambaForCausalLM",
        "LlamaForCausalLM",
        "GPTNeoXForCausalLM",
    ] {
        assert!(
            err.contains(needle),
            "stderr should mention {needle}: {err}"
        );
    }
}

#[test]
fn bad_config_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_ckpt(tmp.path());
    edit_config(&ck, |c| {
        c.remove("hidden_size");
    });
    let (ok, _, err) = ckmerge_eval(&[&ck, &"--data", &root().join("data/heldout.txt")]);
    assert!(
        !ok && err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    let ck2 = tmp.path().join("ckpt");
    edit_config(&ck2, |c| {
        c.insert("hidden_size".into(), 64.into());
        c.insert("intermediate_size".into(), 100.into());
    });
    let (ok, _, err) = ckmerge_eval(&[&ck2, &"--data", &root().join("data/heldout.txt")]);
    assert!(
        !ok && err.contains("mlp.gate_proj.weight") && err.contains("[100, 64]"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_ckpt(tmp.path());
    std::fs::remove_file(ck.join("tokenizer.json")).unwrap();
    let (ok, _, err) = ckmerge_eval(&[&ck, &"--data", &root().join("data/heldout.txt")]);
    assert!(
        !ok && err.contains("no tokenizer.json") && err.contains(".npy"),
        "{err}"
    );
}

#[test]
fn empty_or_short_data_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let ck = root().join("llama/step-1500");
    let (ok, _, err) = ckmerge_eval(&[&ck, &"--data", &empty]);
    assert!(
        !ok && err.contains("0 tokens") && err.contains("--seq-len"),
        "{err}"
    );
    let short = tmp.path().join("short.jsonl");
    std::fs::write(&short, "{\"text\": \"fn main() {}\"}\n").unwrap();
    let (ok, _, err) = ckmerge_eval(&[&ck, &"--data", &short]);
    assert!(!ok && err.contains("fewer than one window of 128"), "{err}");
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"content\": \"x\"}\n").unwrap();
    let (ok, _, err) = ckmerge_eval(&[&ck, &"--data", &bad]);
    assert!(
        !ok && err.contains("bad.jsonl") && err.contains("line 1") && err.contains("\"text\""),
        "{err}"
    );
}

#[test]
fn jsonl_directory_and_pretokenized_data_give_the_txt_result() {
    // The same document as .txt, as one .jsonl record, in a directory, and as a .bin of
    // its tokens.
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("data/heldout.txt")).unwrap();
    let jsonl = tmp.path().join("h.jsonl");
    std::fs::write(
        &jsonl,
        serde_json::json!({ "text": text }).to_string() + "\n",
    )
    .unwrap();
    let ck = root().join("llama/step-1500");
    let run = |data: &Path| {
        let (ok, out, err) =
            ckmerge_eval(&[&ck, &"--data", &data, &"--json", &"--max-tokens", &"3000"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        v["datasets"][0]["mean_nll"].as_f64().unwrap()
    };
    let txt = run(&root().join("data/heldout.txt"));
    // Same tokens give the same score; 1e-12 relative rather than bit equality across
    // processes (see `repeated_scores_are_bit_identical`). Other tokens move it by >1e-4.
    let same = |got: f64, what: &str| {
        assert!(
            (got - txt).abs() <= 1e-12 * txt,
            "{what}: {got} vs .txt {txt}"
        )
    };
    same(run(&jsonl), ".jsonl");
    let dir = tmp.path().join("dir/nested");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root().join("data/heldout.txt"), dir.join("a.txt")).unwrap();
    std::fs::write(dir.join("notes.md"), "ignored: not a data format").unwrap();
    same(run(&tmp.path().join("dir")), "directory");
    let tok = tokenizers::Tokenizer::from_file(ck.join("tokenizer.json")).unwrap();
    let ids = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
    let bin = tmp.path().join("h.bin");
    std::fs::write(
        &bin,
        ids.iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    same(run(&bin), ".bin");
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
