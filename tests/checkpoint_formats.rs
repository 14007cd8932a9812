//! Checkpoints as trajectories are published: `pytorch_model.bin` (single and sharded,
//! written by torch; tests/fixtures/trajectory/bin, made by
//! scripts/fixtures/make_torch_bin.py from the safetensors fixtures), mixed with
//! safetensors, tied weights stored twice, and `org/name@revision` in a local Hugging
//! Face cache. Each is checked against the safetensors fixtures it was made from: the
//! same scores as transformers, the same merged bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckmerge_worker::test_support::{check, fixtures as root, golden, golden_merge_nll};
use safetensors::SafeTensors;
use serde_json::Value;
use support::{ckmerge, copy_dir, stderr, stdout};

mod support;

fn bin() -> PathBuf {
    root().join("bin")
}

/// What a merged model directory holds, as a loader sees it: every tensor (name, dtype,
/// shape, bytes) and every other file but ckmerge.json. Not the raw shard bytes: their
/// headers record the source paths, and list tensors in the first source's storage order
/// (a `.bin` state dict's order is not a safetensors file's).
type Model = (
    BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
    BTreeMap<String, Vec<u8>>,
);

fn model(dir: &Path) -> Model {
    let (mut tensors, mut files) = (BTreeMap::new(), BTreeMap::new());
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(e.path()).unwrap();
        if name.ends_with(".safetensors") {
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (n, t) in st.tensors() {
                let v = (
                    format!("{:?}", t.dtype()),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                );
                tensors.insert(n, v);
            }
        } else if name != "ckmerge.json" && !name.ends_with(".index.json") {
            files.insert(name, bytes);
        }
    }
    assert!(!tensors.is_empty(), "{}: no tensors", dir.display());
    (tensors, files)
}

fn merge(out: &Path, a: &dyn AsRef<std::ffi::OsStr>, b: &dyn AsRef<std::ffi::OsStr>) {
    let o = ckmerge("merge", &[a, b, &"--lambda", &"0.5", &"--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bin_checkpoints_score_as_transformers_scores_them() {
    let heldout = root().join("data/heldout.txt");
    let want = golden_merge_nll("llama", "step-1500", 0.5);
    // Both .bin (one single-file, one sharded), and .bin mixed with safetensors.
    for (a, b) in [
        (bin().join("llama/step-1250"), bin().join("llama/step-1500")),
        (
            bin().join("llama/step-1250"),
            root().join("llama/step-1500"),
        ),
    ] {
        let o = ckmerge(
            "eval",
            &[&a, &b, &"--lambda", &"0.5", &"--data", &heldout, &"--json"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        check(
            &format!("{} + {}", a.display(), b.display()),
            v["datasets"][0]["mean_nll"].as_f64().unwrap(),
            want,
        );
    }
}

#[test]
fn bin_inputs_merge_to_the_tensors_of_safetensors_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("from-safetensors");
    merge(
        &st,
        &root().join("llama/step-1250"),
        &root().join("llama/step-1500"),
    );
    let from_bin = tmp.path().join("from-bin");
    merge(
        &from_bin,
        &bin().join("llama/step-1250"),
        &bin().join("llama/step-1500"),
    );
    let mixed = tmp.path().join("mixed");
    merge(
        &mixed,
        &root().join("llama/step-1250"),
        &bin().join("llama/step-1500"),
    );
    let want = model(&st);
    assert!(model(&from_bin) == want, "merged from .bin differs");
    assert!(model(&mixed) == want, "merged from mixed inputs differs");
}

/// A tied model's `.bin` holds `lm_head.weight` as the embedding's storage; the
/// safetensors file holds it once. The two must list the same tensors and merge.
#[test]
fn tied_weights_stored_twice_are_read_once() {
    let tmp = tempfile::tempdir().unwrap();
    let st = root().join("variants/llama-tied-llama3-rope");
    let st_copy = tmp.path().join("st-copy");
    copy_dir(&st, &st_copy);
    let want = tmp.path().join("want");
    merge(&want, &st, &st_copy);
    let got = tmp.path().join("got");
    merge(&got, &bin().join("llama-tied"), &st);
    assert!(model(&got) == model(&want));
}

/// Pythia's older revisions hold buffers transformers no longer saves and ignores on
/// load (a bool causal mask, `masked_bias`, rotary `inv_freq`); ckmerge refused the bool
/// mask as a non-float tensor. They are left out, as transformers leaves them out.
#[test]
fn old_gpt_neox_buffers_are_left_out_as_transformers_leaves_them() {
    let ck = bin().join("neox-buffers/step-1500");
    let o = ckmerge(
        "eval",
        &[&ck, &"--data", &root().join("data/heldout.txt"), &"--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let want = golden()["models"]["neox"]["checkpoints"]["step-1500"]["heldout"]["mean_nll"]
        .as_f64()
        .unwrap();
    check(
        "neox step-1500 with buffers",
        v["datasets"][0]["mean_nll"].as_f64().unwrap(),
        want,
    );
    let tmp = tempfile::tempdir().unwrap();
    let (got, want) = (tmp.path().join("got"), tmp.path().join("want"));
    merge(&got, &root().join("neox/step-1250"), &ck);
    merge(
        &want,
        &root().join("neox/step-1250"),
        &root().join("neox/step-1500"),
    );
    let (tensors, _) = model(&got);
    assert!(!tensors.keys().any(|n| n.ends_with("attention.bias")
        || n.ends_with("masked_bias")
        || n.ends_with("inv_freq")));
    assert!(model(&got) == model(&want));
}

/// Writes a checkpoint directory whose pytorch_model.bin is a zip holding `pkl` as its
/// pickle, with the config of a fixture.
fn checkpoint_with_pickle(dir: &Path, pkl: &[u8]) {
    use std::io::Write;
    copy_dir(&root().join("llama/step-1250"), dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let f = std::fs::File::create(dir.join("pytorch_model.bin")).unwrap();
    let mut w = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pkl).unwrap();
    w.finish().unwrap();
}

#[test]
fn a_malicious_pickle_is_refused_by_name_and_never_run() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    // os.system("touch MARKER") through GLOBAL + REDUCE: what torch.load without
    // weights_only would run.
    let cmd = format!("touch {}", marker.display());
    let mut pkl = b"\x80\x02cos\nsystem\nX".to_vec();
    pkl.extend((cmd.len() as u32).to_le_bytes());
    pkl.extend(cmd.as_bytes());
    pkl.extend(b"\x85R.");
    let evil = tmp.path().join("evil");
    checkpoint_with_pickle(&evil, &pkl);
    let out = tmp.path().join("out");
    let o = ckmerge(
        "merge",
        &[
            &root().join("llama/step-1500"),
            &evil,
            &"--lambda",
            &"0.5",
            &"--out",
            &out,
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("imports `os.system`") && err.contains("pytorch_model.bin"),
        "{err}"
    );
    assert!(!marker.exists() && !out.exists());
}

#[test]
fn the_legacy_torch_format_is_refused_with_how_to_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old");
    copy_dir(&root().join("llama/step-1250"), &old);
    std::fs::remove_file(old.join("model.safetensors")).unwrap();
    // torch < 1.6: a bare pickle stream starting with the magic number.
    std::fs::write(
        old.join("pytorch_model.bin"),
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
    )
    .unwrap();
    let o = ckmerge("eval", &[&old, &"--data", &root().join("data/heldout.txt")]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("legacy format (torch < 1.6"),
        "{}",
        stderr(&o)
    );
}

const COMMIT_A: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const COMMIT_B: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";

/// A Hugging Face cache as `hf download` leaves it, holding two revisions of
/// `fixture-org/tiny-llama` (the trajectory's last two checkpoints): files in `blobs/`,
/// linked from `snapshots/COMMIT/`, and `refs/REVISION` naming the commit.
fn hub_cache(cache: &Path) {
    let repo = cache.join("models--fixture-org--tiny-llama");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (rev, commit, src) in [
        ("step-1250", COMMIT_A, "llama/step-1250"),
        ("main", COMMIT_B, "llama/step-1500"),
    ] {
        let f = repo.join("refs").join(rev);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, commit).unwrap();
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for e in std::fs::read_dir(root().join(src)).unwrap() {
            let e = e.unwrap();
            let blob = format!("{commit}-{}", e.file_name().to_string_lossy());
            std::fs::copy(e.path(), repo.join("blobs").join(&blob)).unwrap();
            std::os::unix::fs::symlink(
                Path::new("../../blobs").join(&blob),
                snap.join(e.file_name()),
            )
            .unwrap();
        }
    }
}

#[test]
fn hub_revisions_resolve_from_the_local_cache_and_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    hub_cache(&cache);
    let run = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut cmd = std::process::Command::new(support::bin());
        cmd.env("HF_HUB_CACHE", &cache).current_dir(tmp.path());
        for a in args {
            cmd.arg(a);
        }
        cmd.output().unwrap()
    };
    let out = tmp.path().join("merged");
    let o = run(&[
        &"merge",
        &"fixture-org/tiny-llama@step-1250",
        &"fixture-org/tiny-llama",
        &"--lambda",
        &"0.5",
        &"--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let direct = tmp.path().join("direct");
    merge(
        &direct,
        &root().join("llama/step-1250"),
        &root().join("llama/step-1500"),
    );
    assert!(model(&out) == model(&direct));
    let prov: Value =
        serde_json::from_slice(&std::fs::read(out.join("ckmerge.json")).unwrap()).unwrap();
    let hub: Vec<(String, String, String)> = prov["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let h = &s["hub"];
            (
                h["repo"].as_str().unwrap().into(),
                h["revision"].as_str().unwrap().into(),
                h["commit"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        hub,
        vec![
            (
                "fixture-org/tiny-llama".into(),
                "step-1250".into(),
                COMMIT_A.into()
            ),
            (
                "fixture-org/tiny-llama".into(),
                "main".into(),
                COMMIT_B.into()
            ),
        ]
    );

    // A revision that was never downloaded: the command that fetches it, nothing written.
    let out2 = tmp.path().join("merged2");
    let o = run(&[
        &"merge",
        &"fixture-org/tiny-llama@step-2000",
        &"fixture-org/tiny-llama",
        &"--lambda",
        &"0.5",
        &"--out",
        &out2,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("hf download fixture-org/tiny-llama --revision step-2000"),
        "{}",
        stderr(&o)
    );
    assert!(!out2.exists());

    // A search config names them the same way; the stored config pins the commits.
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "checkpoints = [\"fixture-org/tiny-llama@step-1250\", \"fixture-org/tiny-llama@main\"]\n\
             [data]\nobjective = [{:?}]\nseq_len = 128\n[search]\nmax_evals = 3\n[output]\nmerge = false\n",
            root().join("data/heldout.txt")
        ),
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    let o = run(&[&"search", &"--config", &cfg, &"--run-dir", &run_dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stored = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(
        stored.contains(&format!("snapshots/{COMMIT_A}"))
            && stored.contains(&format!("snapshots/{COMMIT_B}")),
        "{stored}"
    );
}

/// A search over `.bin` checkpoints, end to end: workers load them, the final merge
/// reads them, and the merged model is the safetensors merge at the same weights.
#[test]
fn a_search_over_bin_checkpoints_runs_to_its_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "checkpoints = [{:?}, {:?}]\n[data]\nobjective = [{:?}]\nseq_len = 128\nmax_tokens = 4096\n\
             [search]\nmax_evals = 3\n[output]\nmerge = true\n",
            bin().join("llama/step-1250"),
            bin().join("llama/step-1500"),
            root().join("data/heldout.txt")
        ),
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    let o = ckmerge(
        "search",
        &[
            &"--config",
            &cfg,
            &"--run-dir",
            &run_dir,
            &"--local-workers",
            &"1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = run_dir.join("merged");
    let prov: Value =
        serde_json::from_slice(&std::fs::read(merged.join("ckmerge.json")).unwrap()).unwrap();
    let w: Vec<String> = prov["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["weight"].as_f64().unwrap().to_string())
        .collect();
    let want = tmp.path().join("want");
    let o = ckmerge(
        "merge",
        &[
            &root().join("llama/step-1250"),
            &root().join("llama/step-1500"),
            &"--weights",
            &w.join(","),
            &"--out",
            &want,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(model(&merged) == model(&want));
}
