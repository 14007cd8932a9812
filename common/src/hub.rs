//! Checkpoints named as users think of them, `org/name@revision`, found in the local
//! Hugging Face cache without any network call.
//!
//! `hf download org/name --revision step1000` stores a revision as
//! `CACHE/models--org--name/snapshots/COMMIT/` (files linked into `blobs/`) and records
//! the branch or tag it came from in `refs/step1000`, a file holding `COMMIT`. The cache
//! is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`, as for
//! `huggingface_hub`. A revision may also be a commit hash given directly. A revision that
//! is not in the cache is an error that prints the command that downloads it: ckmerge
//! never downloads (a merge of tens of checkpoints must not start fetching terabytes).
//!
//! An argument that exists as a path is always a path; only one that does not, and has
//! the `org/name[@revision]` shape, is looked up in the cache.

use std::path::{Component, Path, PathBuf};

/// A model revision in the local Hugging Face cache.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HubRevision {
    /// `org/name`.
    pub repo: String,
    /// The branch, tag or commit the user named (`main` when none).
    pub revision: String,
    /// The commit the snapshot holds.
    pub commit: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("{arg}: no such directory, and {repo}@{revision} is not in the Hugging Face cache ({cache}); ckmerge never downloads. If it is a Hub repository, fetch it with:\n  hf download {repo} --revision {revision}\n(or `huggingface-cli download` with older huggingface_hub); else check the checkpoint's path")]
    NotCached {
        /// The argument as the user gave it.
        arg: String,
        repo: String,
        revision: String,
        cache: PathBuf,
    },
    #[error("{repo}@{revision}: {path}: {reason}")]
    Damaged {
        repo: String,
        revision: String,
        path: PathBuf,
        reason: String,
    },
}

/// The cache directory `huggingface_hub` uses under `env` (an environment lookup).
pub fn cache_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(c) = env("HF_HUB_CACHE").filter(|c| !c.is_empty()) {
        return PathBuf::from(c);
    }
    if let Some(h) = env("HF_HOME").filter(|h| !h.is_empty()) {
        return Path::new(&h).join("hub");
    }
    let home = env("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/huggingface/hub")
}

/// `org/name` or `org/name@revision`, when `arg` has that shape: two name parts of
/// letters, digits, `-`, `_` and `.` (not starting with `.`), and a revision without `..`.
pub fn parse_repo_ref(arg: &str) -> Option<(String, String)> {
    let (repo, revision) = match arg.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (arg, "main"),
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let (org, name) = repo.split_once('/')?;
    let rev_ok = !revision.is_empty()
        && !revision.starts_with('/')
        && Path::new(revision)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    (name_ok(org) && name_ok(name) && rev_ok).then(|| (repo.to_owned(), revision.to_owned()))
}

/// The snapshot directory of `repo@revision` in `cache`.
pub fn snapshot(cache: &Path, repo: &str, revision: &str) -> Result<PathBuf, HubError> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let not_cached = || HubError::NotCached {
        arg: format!("{repo}@{revision}"),
        repo: repo.into(),
        revision: revision.into(),
        cache: cache.into(),
    };
    let ref_file = root.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_file) {
        Ok(c) => {
            let c = c.trim().to_owned();
            if c.len() != 40 || !c.chars().all(|ch| ch.is_ascii_hexdigit()) {
                return Err(HubError::Damaged {
                    repo: repo.into(),
                    revision: revision.into(),
                    path: ref_file,
                    reason: format!("holds `{c}`, not a commit hash"),
                });
            }
            c
        }
        // A commit hash given directly has no ref of its own.
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            revision.to_owned()
        }
        Err(_) => return Err(not_cached()),
    };
    let dir = root.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Err(not_cached());
    }
    Ok(dir)
}

/// Where the checkpoint argument `arg` lives: `arg` itself when it exists (or does not
/// look like `org/name[@revision]`), else its snapshot in the Hugging Face cache.
pub fn resolve(arg: &Path) -> Result<PathBuf, HubError> {
    resolve_in(arg, &|k| std::env::var(k).ok())
}

/// [`resolve`] under the environment `env`.
pub fn resolve_in(arg: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, HubError> {
    if arg.exists() {
        return Ok(arg.to_owned());
    }
    match arg.to_str().and_then(parse_repo_ref) {
        Some((repo, revision)) => {
            snapshot(&cache_dir(env), &repo, &revision).map_err(|e| match e {
                HubError::NotCached {
                    repo,
                    revision,
                    cache,
                    ..
                } => HubError::NotCached {
                    arg: arg.display().to_string(),
                    repo,
                    revision,
                    cache,
                },
                e => e,
            })
        }
        None => Ok(arg.to_owned()),
    }
}

/// The repository, revision and commit of a checkpoint directory inside a Hugging Face
/// cache (`.../models--org--name/snapshots/COMMIT`), for provenance records; the
/// revision is a ref that points at the commit (`main` first), else the commit itself.
pub fn describe(dir: &Path) -> Option<HubRevision> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let commit = dir.file_name()?.to_str()?.to_owned();
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let root = snapshots.parent()?;
    let repo = root
        .file_name()?
        .to_str()?
        .strip_prefix("models--")?
        .replacen("--", "/", 1);
    let mut refs = Vec::new();
    collect_refs(&root.join("refs"), "", &mut refs);
    refs.sort_by_key(|(name, _)| (name != "main", name.clone()));
    let revision = refs
        .into_iter()
        .find(|(_, c)| *c == commit)
        .map_or_else(|| commit.clone(), |(name, _)| name);
    Some(HubRevision {
        repo,
        revision,
        commit,
    })
}

fn collect_refs(dir: &Path, prefix: &str, out: &mut Vec<(String, String)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        let p = e.path();
        if p.is_dir() {
            collect_refs(&p, &format!("{name}/"), out);
        } else if let Ok(c) = std::fs::read_to_string(&p) {
            out.push((name, c.trim().to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str = "1111111111111111111111111111111111111111";
    const C2: &str = "2222222222222222222222222222222222222222";

    /// A cache laid out as `hf download` leaves it: refs, snapshots linking into blobs.
    fn cache() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("models--EleutherAI--pythia-14m");
        for (rev, commit) in [("main", C1), ("step1000", C2), ("refs/pr/1", C2)] {
            let f = root.join("refs").join(rev);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, commit).unwrap();
        }
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        std::fs::write(root.join("blobs/abc"), "{}").unwrap();
        for c in [C1, C2] {
            let s = root.join("snapshots").join(c);
            std::fs::create_dir_all(&s).unwrap();
            std::os::unix::fs::symlink("../../blobs/abc", s.join("config.json")).unwrap();
        }
        t
    }

    fn env_for(cache: &Path) -> impl Fn(&str) -> Option<String> + '_ {
        move |k| (k == "HF_HUB_CACHE").then(|| cache.to_string_lossy().into_owned())
    }

    #[test]
    fn revisions_resolve_offline_to_their_snapshots() {
        let t = cache();
        let env = env_for(t.path());
        let snap = |c: &str| {
            t.path()
                .join("models--EleutherAI--pythia-14m/snapshots")
                .join(c)
        };
        let r = |a: &str| resolve_in(Path::new(a), &env);
        assert_eq!(r("EleutherAI/pythia-14m").unwrap(), snap(C1));
        assert_eq!(r("EleutherAI/pythia-14m@main").unwrap(), snap(C1));
        assert_eq!(r("EleutherAI/pythia-14m@step1000").unwrap(), snap(C2));
        assert_eq!(r("EleutherAI/pythia-14m@refs/pr/1").unwrap(), snap(C2));
        assert_eq!(r(&format!("EleutherAI/pythia-14m@{C2}")).unwrap(), snap(C2));
        let d = describe(&snap(C2)).unwrap();
        assert_eq!(
            (d.repo.as_str(), d.revision.as_str(), d.commit.as_str()),
            ("EleutherAI/pythia-14m", "refs/pr/1", C2)
        );
        assert_eq!(describe(&snap(C1)).unwrap().revision, "main");
        assert_eq!(describe(t.path()), None);
    }

    #[test]
    fn a_revision_not_in_the_cache_prints_the_download_command() {
        let t = cache();
        let env = env_for(t.path());
        let e = resolve_in(Path::new("EleutherAI/pythia-14m@step2000"), &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hf download EleutherAI/pythia-14m --revision step2000"),
            "{e}"
        );
        let e = resolve_in(Path::new("EleutherAI/pythia-70m"), &env).unwrap_err();
        assert!(matches!(e, HubError::NotCached { .. }));
    }

    #[test]
    fn paths_stay_paths() {
        let t = cache();
        let env = env_for(t.path());
        // An existing directory wins even with a repo's shape.
        let local = t.path().join("org/name");
        std::fs::create_dir_all(&local).unwrap();
        assert_eq!(resolve_in(&local, &env).unwrap(), local);
        // Not a repo's shape: returned as given, for the checkpoint reader to report.
        for p in ["./ckpt", "/abs/missing", "a/b/c", "../x/y", "org/.hidden"] {
            assert_eq!(resolve_in(Path::new(p), &env).unwrap(), PathBuf::from(p));
        }
        assert_eq!(parse_repo_ref("org/name@../../etc"), None);
    }

    #[test]
    fn the_cache_directory_follows_huggingface_hub() {
        fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        }
        let all = [("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")];
        assert_eq!(cache_dir(&env(&all)), PathBuf::from("/c"));
        assert_eq!(
            cache_dir(&env(&[("HF_HOME", "/h"), ("HOME", "/u")])),
            PathBuf::from("/h/hub")
        );
        assert_eq!(
            cache_dir(&env(&[("HOME", "/u")])),
            PathBuf::from("/u/.cache/huggingface/hub")
        );
    }
}
