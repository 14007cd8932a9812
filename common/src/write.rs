//! Writing Hugging Face model directories: shard planning with `save_pretrained`'s names
//! and boundaries, safetensors headers, the index, and [`StagedDir`], which makes an
//! output directory appear atomically or not at all.
//!
//! Invariants:
//! - an output is built in a hidden sibling directory and renamed into place only after
//!   every file and the directory itself are synced; a crash at any point leaves no
//!   directory at the output path;
//! - an existing output is replaced only with `force`, only if it looks like a model
//!   directory, and by an atomic exchange where the OS offers one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use crate::checkpoint::SAFE_WEIGHTS_NAME;
use crate::dtype::DType;

/// Name, dtype and shape of a tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// A tensor copied rather than merged (not a float ckmerge merges: a bool mask, an
    /// integer table): its safetensors dtype name and element size; `dtype` is unused.
    pub copied: Option<(String, usize)>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn element_size(&self) -> usize {
        self.copied.as_ref().map_or(self.dtype.size(), |c| c.1)
    }
    pub fn nbytes(&self) -> u64 {
        (self.numel() * self.element_size()) as u64
    }
    /// The dtype as the safetensors header names it.
    pub fn header_dtype(&self) -> &str {
        self.copied
            .as_ref()
            .map_or(self.dtype.safetensors_name(), |c| c.0.as_str())
    }
}

/// One output safetensors file: its name, its tensors (indices into the spec list, in
/// write order) and its complete header, ready to be written before the data.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub file_name: String,
    pub tensors: Vec<usize>,
    /// `u64` length prefix + JSON header padded to 8 bytes, exactly as written.
    pub header: Vec<u8>,
    pub data_bytes: u64,
}

/// Splits tensors into shards the way `save_pretrained` does: in order, starting a new
/// shard when the next tensor would overflow `max_shard_bytes` (a larger tensor gets a
/// shard of its own). One shard is named `model.safetensors`, several are named
/// `model-0000k-of-0000n.safetensors`. `metadata` goes into every header.
pub fn plan_shards(
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
) -> Vec<ShardPlan> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        if !current.is_empty() && size + s.nbytes() > max_shard_bytes {
            groups.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += s.nbytes();
    }
    if !current.is_empty() || groups.is_empty() {
        groups.push(current);
    }
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(k, tensors)| {
            let file_name = if n == 1 {
                SAFE_WEIGHTS_NAME.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            };
            let (header, data_bytes) = safetensors_header(specs, &tensors, metadata);
            ShardPlan {
                file_name,
                tensors,
                header,
                data_bytes,
            }
        })
        .collect()
}

/// The header of a safetensors file holding `specs[i]` for `i` in `order`, laid out
/// back to back in that order. Returns the header bytes (length prefix included, padded
/// with spaces to a multiple of 8 so the data is 8-byte aligned, as the reference
/// implementation does) and the data size.
fn safetensors_header(
    specs: &[TensorSpec],
    order: &[usize],
    metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, u64) {
    let mut obj = Map::new();
    if !metadata.is_empty() {
        obj.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0u64;
    for &i in order {
        let s = &specs[i];
        let end = offset + s.nbytes();
        obj.insert(
            s.name.clone(),
            json!({"dtype": s.header_dtype(), "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(obj)).expect("JSON of strings and numbers");
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut header = Vec::with_capacity(8 + text.len());
    header.extend_from_slice(&(text.len() as u64).to_le_bytes());
    header.extend_from_slice(&text);
    (header, offset)
}

/// `model.safetensors.index.json` for a multi-shard plan, or `None` for a single shard
/// (transformers neither writes nor needs an index then).
pub fn index_json(specs: &[TensorSpec], plans: &[ShardPlan]) -> Option<String> {
    if plans.len() < 2 {
        return None;
    }
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for p in plans {
        for &i in &p.tensors {
            weight_map.insert(specs[i].name.clone(), p.file_name.clone());
            total += specs[i].nbytes();
        }
    }
    let v = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    Some(serde_json::to_string_pretty(&v).expect("JSON of strings and numbers") + "\n")
}

/// Why an output directory could not be prepared or committed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("{0}: already exists; pass --force to replace it, or choose another --out")]
    Exists(PathBuf),
    #[error("{0}: exists and is not a directory; refusing to replace it")]
    NotADirectory(PathBuf),
    #[error("{0}: exists and does not look like a model directory (no config.json or ckmerge.json, not empty); refusing to replace it even with --force")]
    NotAModelDir(PathBuf),
    #[error("{dir}: holds {what}, which is not part of a model (training state?); --force replaces only a directory of model files: remove it yourself, or choose another output")]
    HoldsOtherFiles { dir: PathBuf, what: String },
    #[error("{out}: the output must not be, contain, or lie inside an input checkpoint ({input}); inputs are never modified")]
    OverlapsInput { out: PathBuf, input: PathBuf },
    #[error("{dir}: not enough free space: the output needs {need} but the filesystem has {have} available")]
    NoSpace {
        dir: PathBuf,
        need: String,
        have: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |cause| OutputError::Io {
        path: path.into(),
        cause,
    }
}

/// Staging directories alive in this process, for removal from a signal handler.
static LIVE_STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every staging directory this process still has (for SIGINT/SIGTERM
/// handlers: an interrupted merge leaves nothing behind).
pub fn remove_live_staged_dirs() {
    let dirs = match LIVE_STAGED.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    for d in dirs {
        // The writer threads run on while the handler runs and may create a file between
        // remove_dir_all's listing and its rmdir, which then fails ("directory not
        // empty"): remove until the directory is gone. Once it is, a writer's next file
        // cannot be created (its directory no longer exists), so nothing comes back.
        for _ in 0..400 {
            match std::fs::remove_dir_all(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }
}

/// Whether a file name is one a model directory holds: what describes the model (the
/// files a merge copies, `checkpoint::is_model_aux_file`), its weights, a model card, and
/// what ckmerge writes. `--force` deletes nothing else.
fn is_model_file(name: &str) -> bool {
    crate::checkpoint::is_model_aux_file(name)
        || matches!(name, "ckmerge.json" | "README.md")
        || name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || (name.starts_with("pytorch_model")
            && (name.ends_with(".bin") || name.ends_with(".bin.index.json")))
}

/// The first entries of `dir` that are not model files (subdirectories included), if any.
fn not_model_files(dir: &Path) -> Result<Option<String>, OutputError> {
    let mut other = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map_err(io_err(dir))?.is_file();
        if !is_file {
            other.push(format!("{name}/"));
        } else if !is_model_file(&name) {
            other.push(name);
        }
    }
    other.sort();
    Ok((!other.is_empty()).then(|| {
        let n = other.len();
        let shown: Vec<String> = other
            .into_iter()
            .take(4)
            .map(|o| format!("`{o}`"))
            .collect();
        format!(
            "{}{}",
            shown.join(", "),
            if n > 4 {
                format!(" and {} more", n - 4)
            } else {
                String::new()
            }
        )
    }))
}

/// An output directory under construction in a hidden sibling of its final path.
/// Dropping it without [`StagedDir::commit`] removes it.
pub struct StagedDir {
    final_path: PathBuf,
    tmp: PathBuf,
    replace: bool,
    done: bool,
}

impl StagedDir {
    /// Absolute form of an output path whose last components may not exist yet.
    pub fn absolute(out: &Path) -> Result<PathBuf, OutputError> {
        let abs = std::path::absolute(out).map_err(io_err(out))?;
        // Canonicalize the deepest existing ancestor so symlinks cannot hide an overlap.
        let mut existing = abs.clone();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.parent(), existing.file_name()) {
                (Some(p), Some(n)) => {
                    rest.push(n.to_owned());
                    existing = p.to_path_buf();
                }
                _ => break,
            }
        }
        let mut canon = existing.canonicalize().map_err(io_err(&existing))?;
        for n in rest.into_iter().rev() {
            canon.push(n);
        }
        Ok(canon)
    }

    /// Refuses an output path equal to, inside, or containing any input directory.
    pub fn check_disjoint(out: &Path, inputs: &[PathBuf]) -> Result<(), OutputError> {
        let out_abs = Self::absolute(out)?;
        for input in inputs {
            let in_abs = input.canonicalize().map_err(io_err(input))?;
            if out_abs.starts_with(&in_abs) || in_abs.starts_with(&out_abs) {
                return Err(OutputError::OverlapsInput {
                    out: out.into(),
                    input: input.clone(),
                });
            }
        }
        Ok(())
    }

    /// Prepares `<parent>/.<name>.ckmerge-partial-<pid>` for an output at `out`; creates
    /// missing parent directories; removes partial outputs of earlier ckmerge processes
    /// that died (for example by SIGKILL) while writing the same output.
    pub fn create(out: &Path, force: bool) -> Result<StagedDir, OutputError> {
        let final_path = Self::absolute(out)?;
        let replace = match std::fs::symlink_metadata(&final_path) {
            Ok(_) if !force => return Err(OutputError::Exists(out.into())),
            Ok(m) if !m.is_dir() => return Err(OutputError::NotADirectory(out.into())),
            Ok(_) => {
                let looks_like_model = final_path.join("config.json").exists()
                    || final_path.join("ckmerge.json").exists()
                    || std::fs::read_dir(&final_path)
                        .map_err(io_err(&final_path))?
                        .next()
                        .is_none();
                if !looks_like_model {
                    return Err(OutputError::NotAModelDir(out.into()));
                }
                if let Some(what) = not_model_files(&final_path)? {
                    return Err(OutputError::HoldsOtherFiles {
                        dir: out.into(),
                        what,
                    });
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(out)(e)),
        };
        let parent = final_path.parent().unwrap_or(Path::new("/")).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let name = final_path
            .file_name()
            .ok_or_else(|| OutputError::NotADirectory(out.into()))?
            .to_string_lossy()
            .into_owned();
        let prefix = format!(".{name}.ckmerge-partial-");
        remove_dead_partials(&parent, &prefix);
        let tmp = parent.join(format!("{prefix}{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        if let Ok(mut g) = LIVE_STAGED.lock() {
            g.push(tmp.clone());
        }
        Ok(StagedDir {
            final_path,
            tmp,
            replace,
            done: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Fails early when the filesystem cannot hold `need` more bytes.
    pub fn check_space(&self, need: u64) -> Result<(), OutputError> {
        if let Some(have) = available_bytes(&self.tmp) {
            // Keep a margin for the metadata and for other writers.
            if need.saturating_add(need / 100) > have {
                return Err(OutputError::NoSpace {
                    dir: self.tmp.parent().unwrap_or(&self.tmp).into(),
                    need: crate::size::human_bytes(need),
                    have: crate::size::human_bytes(have),
                });
            }
        }
        Ok(())
    }

    /// Syncs the staging directory and moves it to its final path (exchanging it with an
    /// existing output under `force`), then syncs the parent.
    pub fn commit(mut self) -> Result<PathBuf, OutputError> {
        sync_dir(&self.tmp)?;
        if self.replace {
            exchange_and_remove_old(&self.tmp, &self.final_path)?;
        } else {
            std::fs::rename(&self.tmp, &self.final_path).map_err(io_err(&self.final_path))?;
        }
        self.done = true;
        self.unregister();
        if let Some(parent) = self.final_path.parent() {
            sync_dir(parent)?;
        }
        Ok(self.final_path.clone())
    }

    fn unregister(&self) {
        if let Ok(mut g) = LIVE_STAGED.lock() {
            g.retain(|p| p != &self.tmp);
        }
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
            self.unregister();
        }
    }
}

/// Opens a directory and fsyncs it, so renames and new entries in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), OutputError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

#[cfg(target_os = "linux")]
fn exchange_and_remove_old(tmp: &Path, final_path: &Path) -> Result<(), OutputError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(tmp.as_os_str().as_bytes()).expect("path without NUL");
    let b = CString::new(final_path.as_os_str().as_bytes()).expect("path without NUL");
    // The system call, not glibc's `renameat2` wrapper: the wrapper exists only from
    // glibc 2.28, and the pip wheel is linked against glibc 2.17 (manylinux2014) so that
    // it runs on older cluster images; kernels have had the call since 3.15, and an older
    // one answers ENOSYS, handled below.
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call, and the
    // arguments are those renameat2(2) takes, in its order and C types.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE as libc::c_uint,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // Filesystems without RENAME_EXCHANGE: fall back to two renames.
        if matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return rename_aside_and_remove(tmp, final_path);
        }
        return Err(io_err(final_path)(err));
    }
    // `tmp` now holds the previous output.
    std::fs::remove_dir_all(tmp).map_err(io_err(tmp))
}

#[cfg(not(target_os = "linux"))]
fn exchange_and_remove_old(tmp: &Path, final_path: &Path) -> Result<(), OutputError> {
    rename_aside_and_remove(tmp, final_path)
}

fn rename_aside_and_remove(tmp: &Path, final_path: &Path) -> Result<(), OutputError> {
    let old = tmp.with_extension("old");
    std::fs::rename(final_path, &old).map_err(io_err(final_path))?;
    std::fs::rename(tmp, final_path).map_err(io_err(final_path))?;
    std::fs::remove_dir_all(&old).map_err(io_err(&old))
}

fn remove_dead_partials(parent: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            tracing::info!(
                "removing partial output of a ckmerge process that died: {}",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn process_alive(pid: i32) -> bool {
    if pid == std::process::id() as i32 {
        return true;
    }
    // SAFETY: signal 0 only checks whether the process exists; it sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn available_bytes(dir: &Path) -> Option<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path and `s` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::BF16,
            copied: None,
            shape: vec![n],
        }
    }

    #[test]
    fn shards_like_save_pretrained() {
        let specs = [spec("a", 20), spec("b", 20), spec("c", 200), spec("d", 10)];
        // 40, 40, 400, 20 bytes with a 100-byte limit: [a b] [c] [d].
        let plans = plan_shards(&specs, 100, &BTreeMap::new());
        let groups: Vec<_> = plans.iter().map(|p| p.tensors.clone()).collect();
        assert_eq!(groups, vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plans[1].file_name, "model-00002-of-00003.safetensors");
        let index: Value = serde_json::from_str(&index_json(&specs, &plans).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 500);
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
    }

    #[test]
    fn one_shard_is_model_safetensors_without_index() {
        let specs = [spec("a", 4)];
        let plans = plan_shards(&specs, 1 << 30, &BTreeMap::new());
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].file_name, "model.safetensors");
        assert!(index_json(&specs, &plans).is_none());
    }

    #[test]
    fn header_is_readable_by_the_reference_parser() {
        let specs = [spec("x", 3), spec("y", 5)];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let plan = &plan_shards(&specs, 1 << 30, &meta)[0];
        assert_eq!(plan.header.len() % 8, 0);
        let mut file = plan.header.clone();
        file.extend(std::iter::repeat_n(0u8, plan.data_bytes as usize));
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("y").unwrap().shape(), &[5]);
        let (_, m) = safetensors::SafeTensors::read_metadata(&file).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn staged_dir_vanishes_unless_committed() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        let staged = StagedDir::create(&out, false).unwrap();
        std::fs::write(staged.path().join("f"), b"x").unwrap();
        drop(staged);
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);

        let staged = StagedDir::create(&out, false).unwrap();
        std::fs::write(staged.path().join("config.json"), b"{}").unwrap();
        staged.commit().unwrap();
        assert!(out.join("config.json").exists());
        assert!(matches!(
            StagedDir::create(&out, false),
            Err(OutputError::Exists(_))
        ));
    }

    #[test]
    fn force_replaces_only_model_directories() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        assert!(matches!(
            StagedDir::create(&out, true),
            Err(OutputError::NotAModelDir(_))
        ));

        std::fs::write(out.join("config.json"), b"{}").unwrap();
        // Issue 14, item 15: a config.json made a training directory (optimizer state,
        // trainer files) replaceable, and --force deleted it all.
        std::fs::create_dir(out.join("optimizer")).unwrap();
        match StagedDir::create(&out, true) {
            Err(e @ OutputError::HoldsOtherFiles { .. }) => {
                let e = e.to_string();
                assert!(e.contains("`notes.txt`, `optimizer/`"), "{e}");
            }
            other => panic!(
                "replaced a directory with training state: {:?}",
                other.err()
            ),
        }
        assert!(out.join("optimizer").exists() && out.join("notes.txt").exists());
        std::fs::remove_dir(out.join("optimizer")).unwrap();
        std::fs::remove_file(out.join("notes.txt")).unwrap();
        std::fs::write(out.join("model.safetensors"), b"old").unwrap();
        let staged = StagedDir::create(&out, true).unwrap();
        std::fs::write(staged.path().join("ckmerge.json"), b"{}").unwrap();
        staged.commit().unwrap();
        assert!(out.join("ckmerge.json").exists());
        assert!(!out.join("model.safetensors").exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_output_inside_or_around_an_input() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("ckpt");
        std::fs::create_dir(&input).unwrap();
        let inputs = [input.clone()];
        assert!(StagedDir::check_disjoint(&input, &inputs).is_err());
        assert!(StagedDir::check_disjoint(&input.join("sub/out"), &inputs).is_err());
        assert!(StagedDir::check_disjoint(root.path(), &inputs).is_err());
        assert!(StagedDir::check_disjoint(&root.path().join("other"), &inputs).is_ok());
    }
}
