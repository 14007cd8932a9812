//! What the end-to-end tests share: running the real binary, reading its output, copying
//! fixtures before a test changes them. Each test file includes this module (`mod
//! support;`); a file that does not use a helper would warn about it, hence the allow.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `ckmerge` binary cargo built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ckmerge")
}

/// Runs `ckmerge SUBCOMMAND ARGS...` to the end.
pub fn ckmerge(subcommand: &str, args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg(subcommand);
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("the ckmerge binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copies the files of `src` (not its subdirectories) into `dst`, created if needed.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Overwrites tensor `name` of the safetensors file `file` with 0xFF bytes, which are NaN
/// in f32, bf16 and f16.
pub fn fill_with_nan(file: &Path, name: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    bytes[8 + n + a..8 + n + b].fill(0xFF);
    std::fs::write(file, bytes).unwrap();
}

/// A small tmpfs mounted for one test and unmounted when the test ends, however it ends.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` (mount's syntax: "4m", "240k") on the new directory
    /// `dir`. Only root can mount (CI runs as root); elsewhere this prints that `test`
    /// skipped and returns `None`.
    pub fn mount(dir: &Path, size: &str, test: &str) -> Option<SmallDisk> {
        std::fs::create_dir(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIPPED {test}: mounting a small tmpfs needs root");
            return None;
        }
        Some(SmallDisk(dir.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
