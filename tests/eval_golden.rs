//! `ckmerge eval` as a user runs it: its JSON output against transformers' numbers, and a
//! clear error for every bad input tried. The evaluator's golden tests are in
//! worker/tests/golden.rs.

use std::path::{Path, PathBuf};

use ckmerge_worker::test_support::{check, fixtures as root, golden_merge_nll};
use serde_json::Value;

mod support;

fn ckmerge_eval(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, String, String) {
    let o = support::ckmerge("eval", args);
    (o.status.success(), support::stdout(&o), support::stderr(&o))
}

fn copy_ckpt(tmp: &Path) -> PathBuf {
    let dst = tmp.join("ckpt");
    support::copy_dir(&root().join("llama/step-1500"), &dst);
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
    let want = golden_merge_nll("llama", "step-1500", 0.5);
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

/// Issue 14, item 13: `eval` of a model whose outputs are NaN printed perplexity NaN and
/// exited 0.
#[test]
fn a_non_finite_perplexity_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_ckpt(tmp.path());
    support::fill_with_nan(&ck.join("model.safetensors"), "model.norm.weight");
    let (ok, _, err) = ckmerge_eval(&[&ck, &"--data", &root().join("data/heldout.txt")]);
    assert!(!ok && err.contains("not finite"), "{err}");
}

/// Multiple-choice scoring against lm-evaluation-harness itself
/// (tests/fixtures/trajectory/tasks/cloze.golden.json, from
/// scripts/fixtures/make_mc_task.py): on every fixture model and on the merges the
/// harness scored (written by `ckmerge merge`, as it loaded them), each choice's
/// log-likelihood within 1e-4 relative, is-greedy, and every item's acc and acc_norm
/// identical.
#[test]
fn multiple_choice_scores_are_lm_evaluation_harness_scores() {
    let tasks = root().join("tasks");
    let golden: Value =
        serde_json::from_slice(&std::fs::read(tasks.join("cloze.golden.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (name, g) in golden["models"].as_object().unwrap() {
        let ckpts: Vec<PathBuf> = g["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| root().join(c.as_str().unwrap()))
            .collect();
        let model = if ckpts.len() == 1 {
            ckpts[0].clone()
        } else {
            let w: Vec<String> = g["weights"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.to_string())
                .collect();
            let out = tmp.path().join(name.replace('/', "-"));
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = ckpts
                .iter()
                .map(|c| c as &dyn AsRef<std::ffi::OsStr>)
                .collect();
            let joined = w.join(",");
            args.extend_from_slice(&[&"--weights", &joined, &"--out", &out]);
            let o = support::ckmerge("merge", &args);
            assert!(o.status.success(), "{}", support::stderr(&o));
            out
        };
        let (ok, out, err) =
            ckmerge_eval(&[&model, &"--task", &tasks.join("cloze.jsonl"), &"--json"]);
        assert!(ok, "{name}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let t = &v["tasks"][0];
        let items = t["per_item"].as_array().unwrap();
        let want = g["items"].as_array().unwrap();
        assert_eq!(items.len(), want.len(), "{name}");
        let mut worst = 0.0f64;
        for (i, (got, want)) in items.iter().zip(want).enumerate() {
            let (gl, wl) = (
                got["lls"].as_array().unwrap(),
                want["lls"].as_array().unwrap(),
            );
            assert_eq!(gl.len(), wl.len());
            for (a, b) in gl.iter().zip(wl) {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                let rel = (a - b).abs() / b.abs().max(1e-12);
                worst = worst.max(rel);
                assert!(
                    rel < 1e-4,
                    "{name} item {i}: log-likelihood {a} vs the harness's {b}"
                );
            }
            assert_eq!(got["greedy"], want["greedy"], "{name} item {i}: is_greedy");
            assert_eq!(got["acc"], want["acc"], "{name} item {i}: acc");
            assert_eq!(
                got["acc_norm"], want["acc_norm"],
                "{name} item {i}: acc_norm"
            );
        }
        assert_eq!(t["acc"].as_f64(), g["acc"].as_f64(), "{name}: acc");
        assert_eq!(
            t["acc_norm"].as_f64(),
            g["acc_norm"].as_f64(),
            "{name}: acc_norm"
        );
        eprintln!(
            "{name}: {} items, worst relative log-likelihood difference {worst:.2e}",
            items.len()
        );
    }
}

/// A task file with a broken item is refused before anything is scored, naming the file
/// and the line.
#[test]
fn a_bad_task_file_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.jsonl");
    std::fs::write(
        &p,
        "{\"context\": \"The cat\", \"choices\": [\"sat\", \"ran\"], \"gold\": 0}\n{\"context\": \"A\", \"choices\": [\"b\", \"c\"], \"gold\": 5}\n",
    )
    .unwrap();
    let (ok, _, err) = ckmerge_eval(&[&root().join("llama/step-1500"), &"--task", &p]);
    assert!(!ok);
    assert!(
        err.contains("bad.jsonl") && err.contains("line 2") && err.contains("`gold` is 5"),
        "{err}"
    );
}
