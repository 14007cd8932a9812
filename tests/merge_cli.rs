//! End-to-end tests of `ckmerge merge`: the real binary on the committed fixtures
//! (tests/fixtures/tiny-llama, written by transformers) and on inputs broken in every way
//! the issue lists. Each test works in its own temporary directory; inputs are copied
//! there whenever a test modifies them.
//!
//! Size: one file for every end-to-end test of `ckmerge merge`, sharing its helpers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{copy_dir, stderr};

mod support;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

fn ckmerge(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    support::ckmerge("merge", args)
}

/// The names of the entries of `d`, sorted.
fn file_names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every tensor of a model directory (single file or sharded): name -> (dtype, shape, bytes).
fn read_model(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, t) in st.tensors() {
                out.insert(name, (t.dtype(), t.shape().to_vec(), t.data().to_vec()));
            }
        }
    }
    out
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

/// Asserts a run failed, said `needles` on stderr, and left no output and no partial
/// output beside it.
fn assert_failed_cleanly(o: &Output, out: &Path, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, but ckmerge succeeded; stderr:\n{err}"
    );
    for n in needles {
        assert!(
            err.contains(n),
            "stderr should mention `{n}`; it was:\n{err}"
        );
    }
    assert!(
        !out.exists(),
        "{} exists after a failed merge",
        out.display()
    );
    if let Some(parent) = out.parent().filter(|p| p.exists()) {
        let leftovers: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("ckmerge-partial"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "partial outputs left behind: {leftovers:?}"
        );
    }
}

/// Rewrites `file` (a safetensors file) after applying `edit` to its tensors.
fn rewrite_safetensors(
    file: &Path,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(meta), file).unwrap();
}

fn sha256_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let h = Sha256::digest(std::fs::read(&p).unwrap());
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                format!("{h:x}"),
            )
        })
        .collect()
}

#[test]
fn output_matches_what_transformers_loaded() {
    // transformers-check.json was written by scripts/fixtures/make_tiny_llama.py after
    // loading ckmerge's merges with AutoModelForCausalLM.from_pretrained; the same
    // merges today must give the same tensors, byte for byte, and the same files.
    let record: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("transformers-check.json")).unwrap())
            .unwrap();
    let merges = record["merges"].as_array().unwrap();
    assert_eq!(merges.len(), 3);
    let tmp = tempfile::tempdir().unwrap();
    for (k, m) in merges.iter().enumerate() {
        let out = tmp.path().join(format!("merged-{k}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckmerge"));
        cmd.arg("merge");
        for a in m["args"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            if a.starts_with("step-") {
                cmd.arg(fixtures().join(a));
            } else {
                cmd.arg(a);
            }
        }
        let o = cmd.arg("--out").arg(&out).output().unwrap();
        assert!(o.status.success(), "merge {k} failed:\n{}", stderr(&o));
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let expected_files: Vec<String> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        assert_eq!(files, expected_files, "merge {k}: files");
        let model = read_model(&out);
        let expected = m["tensor_sha256"].as_object().unwrap();
        assert_eq!(model.len(), expected.len(), "merge {k}: tensor count");
        for (name, (_, _, bytes)) in &model {
            let got = format!("{:x}", Sha256::digest(bytes));
            assert_eq!(
                &got,
                expected[name].as_str().unwrap(),
                "merge {k}: tensor {name} differs from the bytes transformers loaded"
            );
        }
    }
}

#[test]
fn merge_is_within_one_ulp_of_float64_reference_across_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (a, b, c) = (
        fixtures().join("step-100"),
        fixtures().join("step-200"),
        fixtures().join("step-300"),
    );
    let o = ckmerge(&[
        &a,
        &b,
        &c,
        &"--weights",
        &"0.25,0.35,0.4",
        &"--out",
        &out,
        &"--max-shard-size",
        &"50KB",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let srcs = [read_model(&a), read_model(&b), read_model(&c)];
    let merged = read_model(&out);
    let w = [0.25f32, 0.35, 0.4];
    assert_eq!(
        merged.keys().collect::<Vec<_>>(),
        srcs[0].keys().collect::<Vec<_>>()
    );
    for (name, (dtype, shape, bytes)) in &merged {
        assert_eq!(*dtype, Dtype::BF16, "{name}: dtype kept from the sources");
        assert_eq!(shape, &srcs[0][name].1);
        let got = decode(*dtype, bytes);
        let xs: Vec<Vec<f64>> = srcs.iter().map(|s| decode(s[name].0, &s[name].2)).collect();
        for j in 0..got.len() {
            let exact: f64 = (0..3).map(|i| w[i] as f64 * xs[i][j]).sum();
            let abs_sum: f64 = (0..3).map(|i| (w[i] as f64 * xs[i][j]).abs()).sum();
            // One bf16 ulp at the larger magnitude, plus the fp32 accumulation bound.
            let m = exact.abs().max(got[j].abs()).max(f64::MIN_POSITIVE);
            let ulp = 2f64.powi(m.log2().floor() as i32 - 7);
            let bound = ulp + 3.0 * 2f64.powi(-24) * abs_sum;
            assert!(
                (got[j] - exact).abs() <= bound,
                "{name}[{j}]: expected {exact}, got {}",
                got[j]
            );
        }
    }
    // Sharded like save_pretrained, with an index that matches the shards.
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let wm = index["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), merged.len());
    for (name, file) in wm {
        let bytes = std::fs::read(out.join(file.as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensor(name).is_ok(), "{name} not in {file}");
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        // Like `save_pretrained`, the limit counts tensor bytes, not the header (whose
        // size depends on the source paths recorded in the metadata).
        let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
        assert!(
            data <= 50_000 || st.len() == 1,
            "{file} holds {data} tensor bytes, over the 50KB shard size"
        );
    }
    // Provenance and the non-weight files.
    let prov: Value =
        serde_json::from_slice(&std::fs::read(out.join("ckmerge.json")).unwrap()).unwrap();
    assert_eq!(prov["sources"][2]["weight"].as_f64().unwrap() as f32, 0.4);
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} not copied");
    }
}

#[test]
fn dtype_conversion_updates_config_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (fixtures().join("step-100"), fixtures().join("step-300"));
    let out1 = tmp.path().join("one");
    let out2 = tmp.path().join("two");
    for out in [&out1, &out2] {
        let o = ckmerge(&[
            &a,
            &b,
            &"--lambda",
            &"0.6",
            &"--dtype",
            &"f32",
            &"--out",
            out,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(out1.join("config.json")).unwrap()).unwrap();
    let key = if config.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    assert_eq!(config[key], "float32");
    assert_eq!(
        std::fs::read(out1.join("model.safetensors")).unwrap(),
        std::fs::read(out2.join("model.safetensors")).unwrap()
    );
    assert!(read_model(&out1).values().all(|t| t.0 == Dtype::F32));
}

#[test]
fn inputs_are_never_modified() {
    let before: Vec<_> = ["step-100", "step-200", "step-300"]
        .iter()
        .map(|s| sha256_files(&fixtures().join(s)))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = ckmerge(&[
        &fixtures().join("step-100"),
        &fixtures().join("step-200"),
        &fixtures().join("step-300"),
        &"--weights",
        &"1,1,1",
        &"--normalize",
        &"--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after: Vec<_> = ["step-100", "step-200", "step-300"]
        .iter()
        .map(|s| sha256_files(&fixtures().join(s)))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn existing_output_needs_force_and_output_may_not_touch_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    copy_dir(&fixtures().join("step-100"), &a);
    copy_dir(&fixtures().join("step-300"), &b);
    let out = tmp.path().join("out");
    assert!(ckmerge(&[&a, &b, &"--lambda", &"0.5", &"--out", &out])
        .status
        .success());
    let o = ckmerge(&[&a, &b, &"--lambda", &"0.7", &"--out", &out]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already exists") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    let o = ckmerge(&[&a, &b, &"--lambda", &"0.7", &"--out", &out, &"--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let prov: Value =
        serde_json::from_slice(&std::fs::read(out.join("ckmerge.json")).unwrap()).unwrap();
    assert_eq!(prov["sources"][1]["weight"].as_f64().unwrap() as f32, 0.7);

    let inside = a.join("merged");
    let o = ckmerge(&[&a, &b, &"--lambda", &"0.5", &"--out", &inside]);
    let a_str = a.display().to_string();
    assert_failed_cleanly(
        &o,
        &inside,
        &["must not be, contain, or lie inside an input", &a_str],
    );
    // Even --force never replaces an input.
    let o = ckmerge(&[&a, &b, &"--lambda", &"0.5", &"--out", &a, &"--force"]);
    assert!(!o.status.success());
    assert!(a.join("model.safetensors").exists());
}

/// Sets up `a` (a copy of step-100) and `b` (a copy of step-200, sharded), lets `break_b`
/// damage `b`, runs a merge and checks it fails cleanly mentioning `needles`.
fn expect_rejected(break_b: impl FnOnce(&Path), needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    copy_dir(&fixtures().join("step-100"), &a);
    copy_dir(&fixtures().join("step-200"), &b);
    break_b(&b);
    let out = tmp.path().join("merged");
    let o = ckmerge(&[&a, &b, &"--lambda", &"0.5", &"--out", &out]);
    assert_failed_cleanly(&o, &out, needles);
}

fn shard_holding(dir: &Path, tensor: &str) -> PathBuf {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    dir.join(index["weight_map"][tensor].as_str().unwrap())
}

const T: &str = "model.layers.1.mlp.down_proj.weight";

#[test]
fn shape_mismatch_is_rejected() {
    expect_rejected(
        |b| {
            let shard = shard_holding(b, T);
            rewrite_safetensors(&shard, |ts| {
                let t = ts.iter_mut().find(|t| t.0 == T).unwrap();
                let row = t.2[1] * 2;
                t.2[0] -= 1;
                t.3.truncate(t.3.len() - row);
            });
        },
        &[T, "[63, 128]", "model-0000", "cannot be merged"],
    );
}

#[test]
fn dtype_mismatch_is_rejected() {
    expect_rejected(
        |b| {
            rewrite_safetensors(&shard_holding(b, T), |ts| {
                let t = ts.iter_mut().find(|t| t.0 == T).unwrap();
                t.1 = Dtype::F16;
            });
        },
        &[T, "F16", "BF16"],
    );
}

#[test]
fn name_mismatch_is_rejected() {
    expect_rejected(
        |b| {
            let shard = shard_holding(b, T);
            rewrite_safetensors(&shard, |ts| {
                ts.iter_mut().find(|t| t.0 == T).unwrap().0 =
                    "model.layers.1.mlp.renamed.weight".into();
            });
            // Keep the index consistent so the mismatch is between checkpoints.
            let p = b.join("model.safetensors.index.json");
            let text = std::fs::read_to_string(&p)
                .unwrap()
                .replace(T, "model.layers.1.mlp.renamed.weight");
            std::fs::write(p, text).unwrap();
        },
        &[T, "missing from", "model.layers.1.mlp.renamed.weight"],
    );
}

#[test]
fn truncated_shard_is_rejected() {
    expect_rejected(
        |b| {
            let shard = shard_holding(b, T);
            let len = std::fs::metadata(&shard).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&shard)
                .unwrap()
                .set_len(len - 100)
                .unwrap();
        },
        &["model-0000", "truncated or corrupt"],
    );
}

#[test]
fn corrupt_header_is_rejected() {
    expect_rejected(
        |b| {
            let shard = shard_holding(b, T);
            let mut bytes = std::fs::read(&shard).unwrap();
            bytes[8..20].copy_from_slice(b"#garbage!#%$");
            std::fs::write(&shard, bytes).unwrap();
        },
        &["model-0000", "not a valid safetensors file"],
    );
}

#[test]
fn bad_index_json_is_rejected() {
    expect_rejected(
        |b| std::fs::write(b.join("model.safetensors.index.json"), "{\"weight_map\": {").unwrap(),
        &["model.safetensors.index.json", "invalid index"],
    );
}

#[test]
fn missing_shard_is_rejected() {
    let shard = shard_holding(&fixtures().join("step-200"), T);
    let shard = shard.file_name().unwrap().to_string_lossy().into_owned();
    expect_rejected(
        |b| std::fs::remove_file(shard_holding(b, T)).unwrap(),
        &["model.safetensors.index.json", &shard, "does not exist"],
    );
}

#[test]
fn missing_config_is_rejected() {
    expect_rejected(
        |b| std::fs::remove_file(b.join("config.json")).unwrap(),
        &["no config.json"],
    );
}

#[test]
fn config_mismatch_is_rejected() {
    expect_rejected(
        |b| {
            let p = b.join("config.json");
            let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["rope_theta"] = 500000.0.into();
            c["rope_parameters"] =
                serde_json::json!({"rope_theta": 500000.0, "rope_type": "default"});
            std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
        },
        &["config.json", "rope_"],
    );
}

#[test]
fn unsupported_dtype_is_rejected() {
    // A float in one checkpoint and an integer in another: not the same model.
    expect_rejected(
        |b| {
            rewrite_safetensors(&shard_holding(b, T), |ts| {
                let t = ts.iter_mut().find(|t| t.0 == T).unwrap();
                t.1 = Dtype::I16;
            });
        },
        &[T, "missing from"],
    );
    // A sub-byte float ckmerge can neither merge nor copy.
    expect_rejected(
        |b| {
            rewrite_safetensors(&shard_holding(b, T), |ts| {
                let t = ts.iter_mut().find(|t| t.0 == T).unwrap();
                t.1 = Dtype::F4;
                t.2 = vec![t.3.len() * 2];
            });
        },
        &[T, "F4", "neither merge"],
    );
}

/// Issue 15, item 2: tensors that are not floats (a bool mask, an integer table) were
/// refused. They are copied from the first checkpoint when every checkpoint holds the
/// same bytes, and refused by name when they differ; never averaged.
#[test]
fn non_float_tensors_are_copied_when_equal_and_refused_when_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    copy_dir(&fixtures().join("step-100"), &a);
    copy_dir(&fixtures().join("step-200"), &b);
    let mask: Vec<u8> = (0..64u8).map(|i| i % 3 / 2).collect();
    let ids: Vec<u8> = (0..16i64).flat_map(|i| (i * 7).to_le_bytes()).collect();
    let add = |dir: &Path, ids: Vec<u8>| {
        let single = dir.join("model.safetensors");
        let file = if single.exists() {
            single
        } else {
            shard_holding(dir, T)
        };
        rewrite_safetensors(&file, |ts| {
            ts.push((
                "model.causal_mask".into(),
                Dtype::BOOL,
                vec![8, 8],
                mask.clone(),
            ));
            ts.push(("model.position_ids".into(), Dtype::I64, vec![16], ids));
        });
        // A sharded checkpoint's index lists every tensor.
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let mut v: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
            let shard = v["weight_map"][T].clone();
            v["weight_map"]["model.causal_mask"] = shard.clone();
            v["weight_map"]["model.position_ids"] = shard;
            std::fs::write(&index, serde_json::to_vec(&v).unwrap()).unwrap();
        }
    };
    add(&a, ids.clone());
    add(&b, ids.clone());
    let out = tmp.path().join("merged");
    let o = ckmerge(&[&a, &b, &"--lambda", &"0.5", &"--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = read_model(&out);
    assert_eq!(
        merged["model.causal_mask"],
        (Dtype::BOOL, vec![8, 8], mask.clone())
    );
    assert_eq!(
        merged["model.position_ids"],
        (Dtype::I64, vec![16], ids.clone())
    );
    // The float tensors are merged as without them.
    let plain = tmp.path().join("plain");
    let o = ckmerge(&[
        &fixtures().join("step-100"),
        &fixtures().join("step-200"),
        &"--lambda",
        &"0.5",
        &"--out",
        &plain,
    ]);
    assert!(o.status.success());
    let plain = read_model(&plain);
    assert_eq!(merged.len(), plain.len() + 2);
    for (name, t) in &plain {
        assert_eq!(&merged[name], t, "{name}");
    }
    // verify checks the copied tensors too.
    let o = support::ckmerge("verify", &[&out]);
    assert!(o.status.success(), "{}", support::stdout(&o));

    // Different integers in the two checkpoints: refused, naming the tensor.
    let c = tmp.path().join("c");
    copy_dir(&fixtures().join("step-300"), &c);
    let mut other = ids.clone();
    other[0] ^= 1;
    add(&c, other);
    let out2 = tmp.path().join("merged2");
    let o = ckmerge(&[&a, &c, &"--lambda", &"0.5", &"--out", &out2]);
    assert_failed_cleanly(&o, &out2, &["model.position_ids", "never averaged"]);
}

#[test]
fn a_pytorch_model_bin_that_is_not_a_torch_file_is_named() {
    expect_rejected(
        |b| {
            for e in std::fs::read_dir(b).unwrap() {
                let p = e.unwrap().path();
                if p.to_string_lossy().contains("safetensors") {
                    std::fs::remove_file(p).unwrap();
                }
            }
            std::fs::write(b.join("pytorch_model.bin"), b"not really a pickle").unwrap();
        },
        &["pytorch_model.bin", "not a zip archive"],
    );
}

#[test]
fn bad_weights_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (a, b) = (fixtures().join("step-100"), fixtures().join("step-300"));
    let o = ckmerge(&[&a, &b, &"--weights", &"0.5", &"--out", &out]);
    assert_failed_cleanly(&o, &out, &["1 values for 2 checkpoints"]);
    let o = ckmerge(&[
        &a,
        &b,
        &fixtures().join("step-200"),
        &"--lambda",
        &"0.5",
        &"--out",
        &out,
    ]);
    assert_failed_cleanly(&o, &out, &["exactly two"]);
    let o = ckmerge(&[
        &a,
        &b,
        &"--weights",
        &"1,-1",
        &"--normalize",
        &"--out",
        &out,
    ]);
    assert_failed_cleanly(&o, &out, &["cannot be rescaled"]);
    let o = ckmerge(&[&a, &b, &"--weights", &"0.5,0.6", &"--out", &out]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("sum to 1.1"), "{}", stderr(&o));
}

/// Writes a checkpoint of `n_tensors` f32 tensors of `numel` elements each.
fn synthetic_checkpoint(dir: &Path, n_tensors: usize, numel: usize, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
    )
    .unwrap();
    // One distinct pattern per checkpoint, shared by its tensors: cheap to build.
    let data: Vec<u8> = (0..numel)
        .flat_map(|i| ((i as u32 ^ seed) as f32 * 1e-6).to_le_bytes())
        .collect();
    let views: Vec<(String, TensorView)> = (0..n_tensors)
        .map(|t| {
            (
                format!("layers.{t}.weight"),
                TensorView::new(Dtype::F32, vec![numel], &data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Starts `ckmerge merge --lambda 0.5 a b` into `out` in shards of `shard_size`.
fn spawn_merge(a: &Path, b: &Path, out: &Path, shard_size: &str, err: Stdio) -> Child {
    Command::new(support::bin())
        .args(["merge", "--lambda", "0.5", "--max-shard-size", shard_size])
        .arg("--out")
        .arg(out)
        .arg(a)
        .arg(b)
        .stderr(err)
        .spawn()
        .unwrap()
}

/// The staging directory of a merge running in `dir`, if there is one.
fn staging_dir(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("ckmerge-partial"))
}

/// Waits (up to a minute) until the merge `child` running in `dir` has a staging
/// directory for which `ready` holds, and returns it; fails if the merge ends first.
fn wait_for_staging(dir: &Path, child: &mut Child, ready: impl Fn(&Path) -> bool) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(p) = staging_dir(dir).filter(|p| ready(p)) {
            return p;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the merge ended before the test could act on it"
        );
        assert!(Instant::now() < deadline, "the merge never got that far");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sigkill_mid_merge_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // 2 x 256 MB of f32 inputs: long enough to be caught mid-write.
    synthetic_checkpoint(&a, 16, 4 << 20, 1);
    synthetic_checkpoint(&b, 16, 4 << 20, 2);
    let out = tmp.path().join("merged");
    let mut child = spawn_merge(&a, &b, &out, "64MB", Stdio::null());
    // Wait until the first output shard is being written, then kill without warning.
    let partial = wait_for_staging(tmp.path(), &mut child, |p| {
        p.join("model-00001-of-00006.safetensors").exists()
    });
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "ckmerge finished before the kill; the test needs bigger inputs"
    );
    assert!(!out.exists(), "a killed merge left {}", out.display());

    // The next run cleans up the dead process's partial output and succeeds.
    assert!(partial.exists());
    let o = ckmerge(&[
        &a,
        &b,
        &"--lambda",
        &"0.5",
        &"--max-shard-size",
        &"64MB",
        &"--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!partial.exists(), "stale partial output not removed");
    assert_eq!(read_model(&out).len(), 16);
}

/// Issue 14, item 6: SIGINT or SIGTERM mid-merge said "no output was written" but left
/// the hidden staging directory with shards in 3 of 5 tries (the handler removed it while
/// the writer still wrote). Five interrupts at different moments: nothing left behind.
#[test]
fn an_interrupted_merge_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // Many small shards: a new file every few milliseconds, as the handler removes them.
    synthetic_checkpoint(&a, 192, 1 << 18, 1);
    synthetic_checkpoint(&b, 192, 1 << 18, 2);
    let out = tmp.path().join("merged");
    let shards = |p: &Path| {
        std::fs::read_dir(p).map_or(0, |d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count()
        })
    };
    for (k, sig) in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGINT,
    ]
    .into_iter()
    .enumerate()
    {
        let mut child = spawn_merge(&a, &b, &out, "1MB", Stdio::null());
        // Interrupt at a different point of the write each time.
        wait_for_staging(tmp.path(), &mut child, |p| shards(p) > 8 + 16 * k);
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "try {k}: {status:?}");
        if let Some(p) = staging_dir(tmp.path()) {
            panic!(
                "try {k}: the staging directory was left behind with {} shards",
                shards(&p)
            );
        }
        assert!(
            !out.exists(),
            "try {k}: an interrupted merge left {}",
            out.display()
        );
    }
}

/// Issue 14, item 13: merging a NaN source, or casting to a dtype the values overflow,
/// said nothing. The merge now says how many values are not finite and where.
#[test]
fn non_finite_output_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    copy_dir(&fixtures().join("step-100"), &a);
    copy_dir(&fixtures().join("step-200"), &b);
    let name = "model.norm.weight";
    rewrite_safetensors(&shard_holding(&b, name), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
        t.3.fill(0xFF); // NaN in every float dtype
    });
    let out = tmp.path().join("merged");
    let o = ckmerge(&[&a, &b, &"--lambda", &"0.5", &"--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("NaN or inf (the first in tensor `model.norm.weight`)"),
        "{}",
        stderr(&o)
    );
    let prov: Value =
        serde_json::from_slice(&std::fs::read(out.join("ckmerge.json")).unwrap()).unwrap();
    assert!(prov["non_finite_values"].as_u64().unwrap() > 0);
}

/// Issue 14, item 12: an input truncated during a merge killed it with "Bus error" and
/// no message.
#[test]
fn an_input_truncated_mid_merge_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    synthetic_checkpoint(&a, 16, 4 << 20, 1);
    synthetic_checkpoint(&b, 16, 4 << 20, 2);
    let out = tmp.path().join("merged");
    let mut child = spawn_merge(&a, &b, &out, "64MB", Stdio::piped());
    wait_for_staging(tmp.path(), &mut child, |_| true);
    // Another process truncates an input under the running merge.
    let victim = b.join("model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{:?}", o.status);
    assert!(
        stderr(&o).contains("an input file changed size"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// Issue 14, item 15: a merge onto a full disk named an input file. Two sizes: one the
/// shards do not fit (refused before writing, by the free-space check), one where they
/// fit and the copied tokenizer does not (ENOSPC while writing). Either way the error
/// names the output's filesystem and says it is full, and nothing is left on it.
#[test]
fn a_full_disk_names_the_output_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (fixtures().join("step-100"), fixtures().join("step-200"));
    // model.safetensors is 57 pages; config and generation config 1 each; tokenizer 3.
    for (i, size) in ["64k", "240k"].into_iter().enumerate() {
        let mnt = tmp.path().join(format!("small-{i}"));
        let test = "a_full_disk_names_the_output_and_leaves_nothing";
        let Some(_disk) = support::SmallDisk::mount(&mnt, size, test) else {
            return;
        };
        let out = mnt.join("merged");
        let o = ckmerge(&[&a, &b, &"--lambda", &"0.5", &"--out", &out]);
        let needle = ["not enough free space", "No space left on device"][i];
        assert_failed_cleanly(&o, &out, &[needle]);
        let err = stderr(&o);
        let line = err.lines().find(|l| l.contains(needle)).unwrap();
        assert!(
            line.contains(&*mnt.to_string_lossy()),
            "the error does not name the output's filesystem ({size}): {err}"
        );
        let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
        assert!(left.is_empty(), "left on the full disk ({size}): {left:?}");
    }
}

/// Issue 14, output integrity: `ckmerge verify` re-hashes the shards against ckmerge.json
/// and recomputes every tensor from the sources, bit for bit; a changed byte is found by
/// both checks.
#[test]
fn verify_finds_a_changed_byte_and_accepts_moved_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    copy_dir(&fixtures().join("step-100"), &a);
    copy_dir(&fixtures().join("step-200"), &b);
    let out = tmp.path().join("merged");
    let o = ckmerge(&[
        &a,
        &b,
        &"--weights",
        &"0.3,0.7",
        &"--dtype",
        &"f16",
        &"--max-shard-size",
        &"64KB",
        &"--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let verify = |args: &[&dyn AsRef<std::ffi::OsStr>]| support::ckmerge("verify", args);
    let o = verify(&[&out]);
    assert!(o.status.success(), "{}{}", support::stdout(&o), stderr(&o));
    assert!(
        support::stdout(&o).contains("verified"),
        "{}",
        support::stdout(&o)
    );

    // The same checkpoints elsewhere.
    let (a2, b2) = (tmp.path().join("a2"), tmp.path().join("b2"));
    std::fs::rename(&a, &a2).unwrap();
    std::fs::rename(&b, &b2).unwrap();
    assert!(
        !verify(&[&out]).status.success(),
        "the recorded sources are gone"
    );
    let o = verify(&[&out, &"--sources", &a2, &b2]);
    assert!(o.status.success(), "{}{}", support::stdout(&o), stderr(&o));

    // One byte of one tensor changed in the output.
    let name = "model.layers.0.mlp.up_proj.weight";
    let shard = shard_holding(&out, name);
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize + 6;
    bytes[at] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();
    let o = verify(&[&out, &"--sources", &a2, &b2]);
    assert!(!o.status.success());
    let text = support::stdout(&o);
    assert!(
        text.contains("SHA-256 differs") && text.contains(&format!("{name}: element 3 differs")),
        "{text}"
    );
    let o = verify(&[&out, &"--hashes-only"]);
    assert!(!o.status.success() && support::stdout(&o).contains("SHA-256 differs"));
}

#[test]
fn missing_checkpoint_directory_is_reported_once() {
    // Regression: the I/O cause used to be printed twice ("...(os error 2): ...(os error 2)").
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-ckpt");
    let out = tmp.path().join("out");
    let o = ckmerge(&[
        &missing,
        &fixtures().join("step-100"),
        &"--lambda",
        &"0.5",
        &"--out",
        &out,
    ]);
    assert_failed_cleanly(&o, &out, &["no-such-ckpt"]);
    let err = stderr(&o);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

#[test]
fn a_merge_split_into_parts_writes_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        fixtures().join("step-100"),
        fixtures().join("step-200"),
        tmp.path().join("sources/step-300"),
    );
    // One source holds NaN, so the records of non-finite values are compared too: a
    // split merge's finish step counted none (it merges nothing itself).
    copy_dir(&fixtures().join("step-300"), &c);
    support::fill_with_nan(&c.join("model.safetensors"), "model.norm.weight");
    let whole = tmp.path().join("whole");
    let split = tmp.path().join("split");
    let common: [&dyn AsRef<std::ffi::OsStr>; 6] = [
        &a,
        &b,
        &c,
        &"--weights",
        &"0.2,0.3,0.5",
        &"--max-shard-size",
    ];
    let run = |out: &Path, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = common.to_vec();
        args.extend_from_slice(&[&"50KB", &"--out", &out]);
        args.extend_from_slice(extra);
        ckmerge(&args)
    };
    assert!(run(&whole, &[]).status.success());
    // Finishing before every part is written names the missing shard and its part.
    assert!(run(&split, &[&"--part", &"0/3"]).status.success());
    let o = run(&split, &[&"--finish-parts", &"3"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("run part 1/3"), "{}", stderr(&o));
    assert!(!split.exists());
    for p in ["1/3", "2/3", "1/3"] {
        // (part 1 twice: a rerun skips the shards it already wrote)
        let o = run(&split, &[&"--part", &p]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = run(&split, &[&"--finish-parts", &"3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names = file_names;
    assert_eq!(names(&whole), names(&split));
    let record = |d: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(d.join("ckmerge.json")).unwrap()).unwrap()
    };
    let (w, s) = (record(&whole), record(&split));
    assert!(w["non_finite_values"].as_u64().unwrap() > 0);
    assert_eq!(w["non_finite_values"], s["non_finite_values"]);
    assert_eq!(w["shard_sha256"], s["shard_sha256"]);
    assert!(
        stderr(&o).contains("NaN or inf (the first in tensor `model.norm.weight`)"),
        "the finish step says nothing of the NaN: {}",
        stderr(&o)
    );
    for f in names(&whole) {
        if f == "ckmerge.json" {
            continue; // records the command line, which differs
        }
        assert_eq!(
            std::fs::read(whole.join(&f)).unwrap(),
            std::fs::read(split.join(&f)).unwrap(),
            "{f} differs"
        );
    }
    assert!(
        names(&whole)
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .count()
            > 3
    );
    // The shared parts directory is gone.
    assert_eq!(names(tmp.path()), vec!["sources", "split", "whole"]);
    // Out-of-range parts are refused by the argument parser.
    let o = run(&split, &[&"--part", &"3/3"]);
    assert!(!o.status.success());
}

/// `--window`, `--wma`, `--ema` and `--minus-sqrt` write the same bytes as the explicit
/// weights they stand for, and an impossible one is refused before anything is written.
#[test]
fn trajectory_averages_are_the_weights_they_name() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let (a, b, c) = (f.join("step-100"), f.join("step-200"), f.join("step-300"));
    let merge = |flags: &[&str], name: &str| {
        let out = tmp.path().join(name);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&a, &b, &c];
        for x in flags {
            args.push(x);
        }
        args.push(&"--out");
        args.push(&out);
        let o = ckmerge(&args);
        (o, out)
    };
    // EMA 0.5 over three: (0.25, 0.5, 1) / 1.75.
    let s = 1.75f64;
    let cases: [(&[&str], String); 4] = [
        (&["--window", "2"], "0,0.5,0.5".into()),
        (
            &["--wma"],
            format!("{},{},{}", 1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0),
        ),
        (
            &["--ema", "0.5"],
            format!("{},{},{}", 0.25 / s, 0.5 / s, 1.0 / s),
        ),
        (&["--minus-sqrt", "1"], "0,0,1".into()),
    ];
    for (i, (flags, weights)) in cases.iter().enumerate() {
        let (o, named) = merge(flags, &format!("named-{i}"));
        assert!(o.status.success(), "{flags:?}: {}", stderr(&o));
        let (o, explicit) = merge(&["--weights", weights], &format!("explicit-{i}"));
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            read_model(&named),
            read_model(&explicit),
            "{flags:?} is not --weights {weights}"
        );
    }
    let (o, out) = merge(&["--window", "4"], "too-wide");
    assert_failed_cleanly(&o, &out, &["--window 4", "1 to 3"]);
    let (o, out) = merge(&["--ema", "1.5"], "bad-decay");
    assert_failed_cleanly(&o, &out, &["--ema 1.5", "(0, 1]"]);
}

/// `--json` prints one object with the documented fields (README, "Machine-readable
/// output"), for a whole merge and for a part, and nothing else on standard output.
#[test]
fn merge_json_summary_has_the_documented_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (fixtures().join("step-100"), fixtures().join("step-200"));
    let out = tmp.path().join("merged");
    let merge = |out: &Path, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &a,
            &b,
            &"--weights",
            &"0.25,0.75",
            &"--out",
            &out,
            &"--json",
        ];
        args.extend_from_slice(extra);
        ckmerge(&args)
    };
    let o = merge(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            support::stdout(&o)
        )
    });
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["complete"], true);
    assert!(v["part"].is_null());
    assert_eq!(
        Path::new(v["out"].as_str().unwrap())
            .canonicalize()
            .unwrap(),
        out.canonicalize().unwrap()
    );
    assert_eq!(v["weights"], serde_json::json!([0.25, 0.75]));
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["tensors"].as_u64().unwrap() as usize,
        read_model(&out).len()
    );
    assert_eq!(v["shards"], 1);
    // Tensor data, the shards' headers not counted.
    let written: u64 = read_model(&out)
        .values()
        .map(|(_, _, b)| b.len() as u64)
        .sum();
    assert_eq!(v["bytes_written"].as_u64().unwrap(), written);
    assert!(v["bytes_read"].as_u64().unwrap() > 0 && v["seconds"].as_f64().unwrap() >= 0.0);

    let split = tmp.path().join("split");
    let o = merge(&split, &[&"--part", &"1/2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["complete"], false);
    assert_eq!(v["part"], serde_json::json!({"index": 1, "count": 2}));
}

/// Shell completions and man pages come from the CLI definition and name its commands.
#[test]
fn completions_and_man_pages_are_generated_from_the_cli() {
    for shell in ["bash", "zsh", "fish"] {
        let o = support::ckmerge("completions", &[&shell]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = support::stdout(&o);
        for word in ["search", "merge", "run-dir", "ema"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let o = support::ckmerge("completions", &[&"tcsh"]);
    assert!(!o.status.success(), "an unknown shell is refused");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    let o = support::ckmerge("man", &[&"--out", &dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    for page in [
        "ckmerge.1",
        "ckmerge-search.1",
        "ckmerge-merge.1",
        "ckmerge-eval.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not roff"
        );
    }
    let search = std::fs::read_to_string(dir.join("ckmerge-search.1")).unwrap();
    assert!(search.contains("resume"), "the search page lacks --resume");
    assert!(
        !dir.join("ckmerge-gpu-bench.1").exists(),
        "hidden commands get no page"
    );
    // The pages the wheel installs (committed, so `pip install .` needs no generation step)
    // are these.
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("wheel-data/data/share/man/man1");
    let names = file_names;
    let regenerate = "regenerate them: cargo run -- man --out coordinator/wheel-data/data/share/man/man1 (after removing the old pages)";
    assert_eq!(names(&dir), names(&committed), "{regenerate}");
    for page in names(&dir) {
        assert!(
            std::fs::read(dir.join(&page)).unwrap()
                == std::fs::read(committed.join(&page)).unwrap(),
            "{page} is out of date; {regenerate}"
        );
    }
}
