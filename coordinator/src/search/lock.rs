//! One coordinator per run directory. Two coordinators on one journal would each issue
//! and record trials (the same ids with different weights), and a later resume would
//! throw work away; so a run holds an exclusive `flock` on `RUN_DIR/.lock` for as long as
//! it runs. The kernel releases it when the process ends, however it ends (`kill -9`
//! included): a lock left by a dead coordinator is never in the way, and there is no
//! pid file to clean up. The file holds who took it, for the refusal's message.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const LOCK_FILE: &str = ".lock";

/// The held lock of a run directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist), or says who holds it.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the run's lock {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                bail!(
                    "{}: another ckmerge search is running in this run directory{}; wait for it to end or stop it (Ctrl-C keeps its completed trials), then resume",
                    run_dir.display(),
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" ({holder})")
                    }
                );
            }
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        let host = ckmerge_common::protocol::hostname();
        file.set_len(0)
            .and_then(|_| write!(file, "pid {} on {host}", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(RunLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_refuses_a_second_holder_and_is_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("another ckmerge search")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(a);
        RunLock::acquire(dir.path()).unwrap();
    }
}
