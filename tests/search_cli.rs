//! `ckmerge search` end to end with real processes on loopback: a coordinator and worker
//! processes talking tarpc over TCP, killed and stopped with real signals, on the fixture
//! trajectory (a 2-layer Llama trained on real text; see tests/fixtures/trajectory).
//!
//! Evaluations are made slow where a test must hit one mid-flight: the objective lists
//! the held-out file several times (more windows, same kind of work) and workers run on
//! one thread. The tests that start processes run one at a time (they share two cores,
//! and their deadlines must mean the same thing in every run).
//!
//! Size: one file for every end-to-end test of `ckmerge search` with real processes,
//! sharing the process helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ckmerge_worker::test_support::fixtures;
use serde_json::Value;
use support::{bin, stderr};

mod support;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process killed (and reaped) when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.0.id() as i32, sig) }, 0);
    }

    /// Waits for exit; panics after `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                t0.elapsed() < limit,
                "process still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const SECRET: &str = "test-secret-0123456789abcdef";

fn secret_file(dir: &Path, text: &str) -> PathBuf {
    let f = dir.join(format!("secret-{}", text.len()));
    std::fs::write(&f, text).unwrap();
    f
}

/// Starts `ckmerge worker` on a free loopback port; returns it and its address.
fn worker(dir: &Path, name: &str, secret: &Path) -> (Proc, String) {
    let announce = dir.join(format!("{name}.addr"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(bin())
        .args([
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--gpus",
            "none",
        ])
        .arg("--announce")
        .arg(&announce)
        .arg("--secret-file")
        .arg(secret)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let p = Proc(child);
    let addr = wait_for("the worker's address", Duration::from_secs(20), || {
        let t = std::fs::read_to_string(&announce).ok()?;
        t.lines().next().map(str::to_string)
    });
    (p, addr)
}

struct Cfg<'a> {
    workers: &'a [String],
    max_evals: usize,
    /// Copies of the held-out file in the objective (evaluation cost).
    copies: usize,
    extra: &'a str,
}

fn write_config(dir: &Path, name: &str, c: &Cfg) -> PathBuf {
    let f = fixtures();
    let objective: Vec<String> = (0..c.copies)
        .map(|_| format!("{:?}", f.join("data/heldout.txt")))
        .collect();
    let addrs: Vec<String> = c.workers.iter().map(|a| format!("{a:?}")).collect();
    let text = format!(
        r#"checkpoints = [{:?}, {:?}]
[space]
kind = "lambda"
[data]
objective = [{}]
extra = {{ python-docs = [{:?}] }}
seq_len = 128
[search]
max_evals = {}
[workers]
addresses = [{}]
secret_file = {:?}
heartbeat_s = 0.5
{}
[output]
plots = false
"#,
        f.join("llama/step-1250"),
        f.join("llama/step-1500"),
        objective.join(", "),
        f.join("data/python-docs.txt"),
        c.max_evals,
        addrs.join(", "),
        dir.join(format!("secret-{}", SECRET.len())),
        c.extra,
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn search(args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new(bin());
    c.arg("search").args(args).arg("--threads").arg("1");
    c
}

/// `ckmerge search --config CFG --run-dir RUN_DIR` in the background, output discarded.
fn start_search(cfg: &Path, run_dir: &Path) -> Proc {
    Proc(
        search(&[
            "--config".as_ref(),
            cfg.as_os_str(),
            "--run-dir".as_ref(),
            run_dir.as_os_str(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    )
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn journal(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("trials.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events<'a>(j: &'a [Value], kind: &str) -> Vec<&'a Value> {
    j.iter().filter(|r| r["event"] == kind).collect()
}

/// Done trials: id → objective; panics on a trial done twice.
fn done_ids(j: &[Value]) -> BTreeMap<u64, f64> {
    let mut m = BTreeMap::new();
    for r in events(j, "done") {
        let id = r["trial"].as_u64().unwrap();
        assert!(
            m.insert(id, r["mean_nll"].as_f64().unwrap()).is_none(),
            "trial {id} done twice"
        );
    }
    m
}

fn report(run_dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(run_dir.join("report.json")).unwrap()).unwrap()
}

fn ppl_of(rep: &Value, label: &str) -> f64 {
    rep["references"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == label)
        .unwrap_or_else(|| panic!("no reference {label}"))["scores"][0]["perplexity"]
        .as_f64()
        .unwrap()
}

/// Runs a search to its end and returns its report.
fn search_to_end(cfg: &Path, run_dir: &Path) -> Value {
    let o = run(search(&[
        "--config".as_ref(),
        cfg.as_os_str(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    report(run_dir)
}

/// Mean NLL `ckmerge eval` gives a model directory on the held-out fixture data.
fn eval_nll(model: &Path) -> f64 {
    let o = Command::new(bin())
        .arg("eval")
        .arg(model)
        .arg("--data")
        .arg(fixtures().join("data/heldout.txt"))
        .args(["--seq-len", "128", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["datasets"][0]["mean_nll"].as_f64().unwrap()
}

#[test]
fn embedded_search_beats_both_ends_and_writes_model_and_report() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let o = run(search(&[
        "--config".as_ref(),
        fixtures().join("search.toml").as_os_str(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let rep = report(&run_dir);
    let best = ppl_of(&rep, "best found");
    let (a, b) = (ppl_of(&rep, "step-1250"), ppl_of(&rep, "step-1500"));
    assert!(best < a.min(b) * 0.95, "best {best} vs ends {a}, {b}");
    // The report's best is the journal's best, scored again bit for bit.
    let j = journal(&run_dir);
    let best_nll = done_ids(&j).values().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(
        rep["best"]["mean_nll"].as_f64().unwrap(),
        best_nll,
        "report best is the journal's best"
    );
    let re = rep["references"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == "best found")
        .unwrap()["scores"][0]["mean_nll"]
        .as_f64()
        .unwrap();
    assert_eq!(
        re, best_nll,
        "re-scoring the best weights gives the same value"
    );
    assert_eq!(events(&j, "done").len(), 8);
    // Both domains in the summary, the merged model, the Markdown report and plots.
    assert_eq!(rep["improvement"].as_array().unwrap().len(), 2);
    assert!(run_dir.join("merged/config.json").is_file());
    assert!(run_dir.join("merged/model.safetensors").is_file());
    let md = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(
        md.contains("| **best found** |") && md.contains("python-docs"),
        "{md}"
    );
    for png in ["best_so_far.png", "surrogate.png"] {
        let bytes = std::fs::read(run_dir.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png} is a PNG");
    }
    // The merged model is the best weights' model: `ckmerge eval` on it gives the
    // journal's value.
    assert_eq!(eval_nll(&run_dir.join("merged")), best_nll);
    // A second run into the same directory needs --resume or --force.
    let o = run(search(&[
        "--config".as_ref(),
        fixtures().join("search.toml").as_os_str(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
    ]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    // Resuming a finished run (say, one whose job ended during the report) runs no trial
    // and writes the report again: workers are connected for the re-scoring.
    let o = run(search(&["--resume".as_ref(), run_dir.as_os_str()]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(journal(&run_dir).len(), j.len(), "no new journal record");
    assert_eq!(report(&run_dir)["best"], rep["best"]);
}

#[test]
fn coordinator_and_two_worker_processes_find_a_better_merge() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let secret = secret_file(tmp.path(), SECRET);
    let (mut w1, a1) = worker(tmp.path(), "w1", &secret);
    let (mut w2, a2) = worker(tmp.path(), "w2", &secret);
    let cfg = write_config(
        tmp.path(),
        "run.toml",
        &Cfg {
            workers: &[a1.clone(), a2.clone()],
            max_evals: 7,
            copies: 1,
            extra: "",
        },
    );
    let run_dir = tmp.path().join("run");
    let rep = search_to_end(&cfg, &run_dir);
    let best = ppl_of(&rep, "best found");
    assert!(best < ppl_of(&rep, "step-1250").min(ppl_of(&rep, "step-1500")));
    let j = journal(&run_dir);
    assert_eq!(done_ids(&j).len(), 7);
    let by_worker: BTreeSet<&str> = events(&j, "done")
        .iter()
        .map(|r| r["worker"].as_str().unwrap())
        .collect();
    assert_eq!(by_worker, BTreeSet::from([a1.as_str(), a2.as_str()]));
    // The coordinator shuts its workers down at the end.
    assert!(w1.wait(Duration::from_secs(20)).success());
    assert!(w2.wait(Duration::from_secs(20)).success());
}

/// Issue 14, item 1: two searches that shared a worker got each other's scores (the
/// worker held one model for every connection), and the second's shutdown ended the
/// first's worker. A worker now serves one search at a time: the second is refused,
/// naming the first, and the first runs on, on its own data.
#[test]
fn a_second_search_is_refused_a_worker_that_serves_another() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let secret = secret_file(tmp.path(), SECRET);
    let (mut w, addr) = worker(tmp.path(), "w", &secret);
    let cfg_a = write_config(
        tmp.path(),
        "a.toml",
        &Cfg {
            workers: std::slice::from_ref(&addr),
            max_evals: 40,
            copies: 8,
            extra: "",
        },
    );
    let run_a = tmp.path().join("run-a");
    let _a = start_search(&cfg_a, &run_a);
    wait_for("search A's first trial", Duration::from_secs(120), || {
        (!done_ids(&journal(&run_a)).is_empty()).then_some(())
    });
    let cfg_b = write_config(
        tmp.path(),
        "b.toml",
        &Cfg {
            workers: std::slice::from_ref(&addr),
            max_evals: 4,
            copies: 1,
            extra: "wait_s = 5\n",
        },
    );
    let run_b = tmp.path().join("run-b");
    let o = run(search(&[
        "--config".as_ref(),
        cfg_b.as_os_str(),
        "--run-dir".as_ref(),
        run_b.as_os_str(),
    ]));
    assert!(!o.status.success(), "search B ran on search A's worker");
    assert!(
        stderr(&o).contains("serves another search"),
        "{}",
        stderr(&o)
    );
    assert!(done_ids(&journal(&run_b)).is_empty());
    // A goes on on the same worker, which B did not shut down.
    let n = done_ids(&journal(&run_a)).len();
    wait_for(
        "another trial of search A",
        Duration::from_secs(120),
        || (done_ids(&journal(&run_a)).len() > n).then_some(()),
    );
    assert!(
        w.0.try_wait().unwrap().is_none(),
        "the worker was shut down"
    );
    for (id, nll) in done_ids(&journal(&run_a)) {
        // Held-out perplexity near 19 (NLL ~2.95); on B's data it would differ.
        assert!(nll < 3.2, "trial {id} of A scored {nll}");
    }
}

/// Two worker processes and a coordinator in the background, running slow trials.
struct Running {
    w1: Proc,
    a2: String,
    _w2: Proc,
    coord: Proc,
    run_dir: PathBuf,
    log: PathBuf,
}

impl Running {
    /// Starts the run; returns once a trial is running on w1 (issued to it, not finished).
    fn start(dir: &Path, max_evals: usize, extra: &str) -> (Running, u64) {
        let secret = secret_file(dir, SECRET);
        let (w1, a1) = worker(dir, "w1", &secret);
        let (w2, a2) = worker(dir, "w2", &secret);
        let cfg = write_config(
            dir,
            "run.toml",
            &Cfg {
                workers: &[a1.clone(), a2.clone()],
                max_evals,
                copies: 8,
                extra,
            },
        );
        let run_dir = dir.join("run");
        let log = dir.join("coord.log");
        let coord = Proc(
            search(&[
                "--config".as_ref(),
                cfg.as_os_str(),
                "--run-dir".as_ref(),
                run_dir.as_os_str(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        );
        let victim = wait_for("a trial running on w1", Duration::from_secs(60), || {
            let j = journal(&run_dir);
            let finished: BTreeSet<u64> = j
                .iter()
                .filter(|r| r["event"] != "issued")
                .map(|r| r["trial"].as_u64().unwrap())
                .collect();
            events(&j, "issued")
                .iter()
                .filter(|r| r["worker"] == a1.as_str())
                .map(|r| r["trial"].as_u64().unwrap())
                .find(|t| !finished.contains(t))
        });
        let r = Running {
            w1,
            a2,
            _w2: w2,
            coord,
            run_dir,
            log,
        };
        (r, victim)
    }

    /// Waits for the coordinator; returns its log and the journal.
    fn finish(&mut self) -> (String, Vec<Value>) {
        let status = self.coord.wait(Duration::from_secs(180));
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert!(status.success(), "{log}");
        (log, journal(&self.run_dir))
    }
}

#[test]
fn sigkill_of_a_worker_mid_evaluation_loses_no_trial() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (mut r, victim) = Running::start(tmp.path(), 5, "heartbeat_timeout_s = 3\n");
    r.w1.signal(libc::SIGKILL);
    let (log, j) = r.finish();
    let done = done_ids(&j);
    assert_eq!(done.len(), 5, "the configured number of trials completed");
    assert!(done.contains_key(&victim), "the killed trial was run again");
    let retried = events(&j, "retry")
        .iter()
        .filter(|r| r["trial"].as_u64() == Some(victim))
        .count();
    assert_eq!(retried, 1, "{log}");
    assert!(events(&j, "done")
        .iter()
        .all(|t| t["trial"].as_u64() != Some(victim) || t["worker"] == r.a2.as_str()));
    assert!(log.contains("lost"), "{log}");
}

/// A copy of fixture checkpoint `step` whose tensor `name` is all NaN.
fn nan_checkpoint(dir: &Path, step: &str, name: &str) -> PathBuf {
    let dst = dir.join(step);
    support::copy_dir(&fixtures().join("llama").join(step), &dst);
    support::fill_with_nan(&dst.join("model.safetensors"), name);
    dst
}

/// Issue 14, item 4: a search whose objective is NaN everywhere stopped never (990 trials
/// issued in 45 s, each deterministic NaN retried). Now a NaN is failed at once, without
/// a retry, and the run stops with a clear error after `max_failures_in_row`.
#[test]
fn a_search_whose_objective_is_nan_everywhere_stops_with_a_clear_error() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let a = nan_checkpoint(tmp.path(), "step-1250", "model.norm.weight");
    let b = nan_checkpoint(tmp.path(), "step-1500", "model.norm.weight");
    let cfg = tmp.path().join("nan.toml");
    std::fs::write(
        &cfg,
        format!(
            "checkpoints = [{a:?}, {b:?}]\n[data]\nobjective = [{:?}]\nseq_len = 128\nmax_tokens = 1024\n[search]\nmax_evals = 40\nmax_failures_in_row = 5\n[workers]\nlocal = 1\n[output]\nplots = false\n",
            fixtures().join("data/heldout.txt")
        ),
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    let o = run(search(&[
        "--config".as_ref(),
        cfg.as_os_str(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
    ]));
    assert!(!o.status.success(), "a search that can only fail succeeded");
    let err = stderr(&o);
    assert!(
        err.contains("5 trials in a row failed") && err.contains("not finite"),
        "{err}"
    );
    let j = journal(&run_dir);
    assert_eq!(events(&j, "failed").len(), 5, "{j:?}");
    assert!(events(&j, "retry").is_empty(), "a NaN was retried: {j:?}");
    assert!(done_ids(&j).is_empty());
}

/// Issue 14, item 10: a run directory inside an input checkpoint ran the whole search,
/// wrote its journal into the checkpoint, then failed at the final merge. Now it is
/// refused before anything is written.
#[test]
fn a_run_directory_inside_a_checkpoint_is_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    support::copy_dir(&fixtures().join("llama/step-1250"), &a);
    support::copy_dir(&fixtures().join("llama/step-1500"), &b);
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "checkpoints = [{a:?}, {b:?}]\n[data]\nobjective = [{:?}]\n",
            fixtures().join("data/heldout.txt")
        ),
    )
    .unwrap();
    let before = std::fs::read_dir(&b).unwrap().count();
    let o = run(search(&[
        "--config".as_ref(),
        cfg.as_os_str(),
        "--run-dir".as_ref(),
        b.join("run").as_os_str(),
    ]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is inside the checkpoint"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_dir(&b).unwrap().count(),
        before,
        "nothing written"
    );
}

/// Issue 14, item 7: editing RUN_DIR/config.toml (the seed, the objective) or replacing
/// an input under the same path, then resuming, mixed trials of two objectives silently.
/// The run's fingerprint is checked on resume; nothing is written when it differs.
#[test]
fn a_resume_after_the_config_or_an_input_changed_is_refused() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("heldout.txt");
    std::fs::copy(fixtures().join("data/heldout.txt"), &data).unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "checkpoints = [{:?}, {:?}]\n[data]\nobjective = [{data:?}]\nseq_len = 128\nmax_tokens = 2048\n[search]\nmax_evals = 2\n[workers]\nlocal = 1\n[output]\nplots = false\nmerge = false\n",
            fixtures().join("llama/step-1250"),
            fixtures().join("llama/step-1500"),
        ),
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    search_to_end(&cfg, &run_dir);
    let before = journal(&run_dir);
    let resume = || {
        run(search(&[
            "--resume".as_ref(),
            run_dir.as_os_str(),
            "--max-evals".as_ref(),
            "3".as_ref(),
        ]))
    };
    let stored = run_dir.join("config.toml");
    let text = std::fs::read_to_string(&stored).unwrap();
    assert!(text.contains("seed = 0"), "{text}");
    std::fs::write(&stored, text.replace("seed = 0", "seed = 5")).unwrap();
    let o = resume();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("config `seed`"), "{}", stderr(&o));
    std::fs::write(&stored, &text).unwrap();

    let original = std::fs::read(&data).unwrap();
    let mut changed = original.clone();
    changed[10] ^= 1;
    std::fs::write(&data, &changed).unwrap();
    let o = resume();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("heldout.txt: its contents changed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(journal(&run_dir), before, "a refused resume writes nothing");

    std::fs::write(&data, &original).unwrap();
    // Item 15: an emptied journal resumed from zero without a word.
    let kept = std::fs::read(run_dir.join("trials.jsonl")).unwrap();
    std::fs::write(run_dir.join("trials.jsonl"), b"").unwrap();
    let o = resume();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the journal holds 0 finished trials"),
        "{}",
        stderr(&o)
    );
    std::fs::write(run_dir.join("trials.jsonl"), kept).unwrap();
    let o = resume();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(done_ids(&journal(&run_dir)).len(), 3);
}

/// Issue 14, item 2: a second coordinator on a run directory that is being searched
/// (a resume, or a new run with --force) is refused while the first runs, and nothing of
/// the first run is touched; once the first is killed (-9), its lock is no obstacle.
#[test]
fn a_second_coordinator_on_a_running_run_directory_is_refused() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        "run.toml",
        &Cfg {
            workers: &[],
            max_evals: 40,
            copies: 8,
            extra: "",
        },
    );
    let run_dir = tmp.path().join("run");
    let mut coord = start_search(&cfg, &run_dir);
    wait_for("a first trial done", Duration::from_secs(120), || {
        (!done_ids(&journal(&run_dir)).is_empty()).then_some(())
    });
    for args in [
        vec!["--resume".as_ref(), run_dir.as_os_str()],
        vec![
            "--config".as_ref(),
            cfg.as_os_str(),
            "--run-dir".as_ref(),
            run_dir.as_os_str(),
            "--force".as_ref(),
        ],
    ] {
        let o = run(search(&args));
        assert!(
            !o.status.success(),
            "{args:?} ran beside the first coordinator"
        );
        assert!(
            stderr(&o).contains("another ckmerge search is running"),
            "{}",
            stderr(&o)
        );
    }
    assert!(
        run_dir.join("config.toml").is_file() && coord.0.try_wait().unwrap().is_none(),
        "the refused coordinators left the running one and its directory alone"
    );
    coord.signal(libc::SIGKILL);
    coord.wait(Duration::from_secs(10));
    let done = done_ids(&journal(&run_dir)).len();
    let o = run(search(&[
        "--resume".as_ref(),
        run_dir.as_os_str(),
        "--max-evals".as_ref(),
        (done + 1).to_string().as_ref(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(done_ids(&journal(&run_dir)).len(), done + 1);
}

#[test]
fn sigkill_of_the_coordinator_then_resume_loses_and_redoes_nothing() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        "run.toml",
        &Cfg {
            workers: &[],
            max_evals: 6,
            copies: 8,
            extra: "",
        },
    );
    let run_dir = tmp.path().join("run");
    let mut coord = start_search(&cfg, &run_dir);
    // Kill it with two trials done and the third in flight.
    wait_for(
        "two trials done and one in flight",
        Duration::from_secs(120),
        || {
            let j = journal(&run_dir);
            (done_ids(&j).len() == 2 && events(&j, "issued").len() == 3).then_some(())
        },
    );
    coord.signal(libc::SIGKILL);
    coord.wait(Duration::from_secs(10));
    let before = journal(&run_dir);
    let done_before = done_ids(&before);
    let in_flight: Vec<u64> = events(&before, "issued")
        .iter()
        .map(|r| r["trial"].as_u64().unwrap())
        .filter(|t| !done_before.contains_key(t))
        .collect();
    assert_eq!(in_flight.len(), 1);

    // A resume with a config that changes the objective is refused, naming the field.
    let other = write_config(
        tmp.path(),
        "other.toml",
        &Cfg {
            workers: &[],
            max_evals: 6,
            copies: 1,
            extra: "",
        },
    );
    let o = run(search(&[
        "--resume".as_ref(),
        run_dir.as_os_str(),
        "--config".as_ref(),
        other.as_os_str(),
    ]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("data:") && stderr(&o).contains("cannot resume"),
        "{}",
        stderr(&o)
    );
    assert_eq!(journal(&run_dir), before, "a refused resume writes nothing");

    let o = run(search(&["--resume".as_ref(), run_dir.as_os_str()]));
    assert!(o.status.success(), "{}", stderr(&o));
    let after = journal(&run_dir);
    let done_after = done_ids(&after);
    assert_eq!(done_after.len(), 6);
    for (id, v) in &done_before {
        assert_eq!(
            done_after.get(id),
            Some(v),
            "completed trial {id} kept as it was"
        );
    }
    // Nothing completed was issued again; the in-flight trial was, under its own id.
    let reissued: Vec<u64> = events(&after[before.len()..], "issued")
        .iter()
        .map(|r| r["trial"].as_u64().unwrap())
        .collect();
    assert!(reissued.iter().all(|t| !done_before.contains_key(t)));
    assert_eq!(reissued[0], in_flight[0]);
    assert!(done_after.contains_key(&in_flight[0]));
}

#[test]
fn wrong_secret_and_wrong_version_are_refused() {
    let _g = serial();
    use ckmerge_common::protocol::{connect, HandshakeError, Secret, PROTOCOL_VERSION};
    let tmp = tempfile::tempdir().unwrap();
    let secret = secret_file(tmp.path(), SECRET);
    let (_w, addr) = worker(tmp.path(), "w", &secret);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
    let bad = Secret::new(b"another-secret-0123456789".to_vec()).unwrap();
    rt.block_on(async {
        let e = connect(&addr, &bad, PROTOCOL_VERSION).await.err().unwrap();
        assert!(matches!(e, HandshakeError::Auth), "{e}");
        let e = connect(&addr, &good, PROTOCOL_VERSION + 1)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, HandshakeError::Version { .. }), "{e}");
        // The right secret and version get served.
        let c = connect(&addr, &good, PROTOCOL_VERSION).await.unwrap();
        let s = c.status(tarpc::context::current()).await.unwrap();
        assert!(!s.loaded);
    });
    let log = wait_for("the worker's log", Duration::from_secs(5), || {
        let l = std::fs::read_to_string(tmp.path().join("w.log")).ok()?;
        (l.matches("refused connection").count() >= 2).then_some(l)
    });
    assert!(
        log.contains("authentication failed") && log.contains("version"),
        "{log}"
    );

    // A coordinator with the wrong secret gives up with a clear message.
    let cfg = write_config(
        tmp.path(),
        "run.toml",
        &Cfg {
            workers: std::slice::from_ref(&addr),
            max_evals: 2,
            copies: 1,
            extra: "",
        },
    );
    let wrong = tmp.path().join("wrong-secret");
    std::fs::write(&wrong, "not-the-run-secret-0123456").unwrap();
    let o = run(search(&[
        "--config".as_ref(),
        cfg.as_os_str(),
        "--run-dir".as_ref(),
        tmp.path().join("run").as_os_str(),
        "--secret-file".as_ref(),
        wrong.as_os_str(),
    ]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("authentication failed"),
        "{}",
        stderr(&o)
    );

    // Bad input fails before any worker is asked to load: the worker is still empty.
    let bad_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("python-docs.txt", "missing.txt");
    std::fs::write(&cfg, bad_cfg).unwrap();
    let o = run(search(&[
        "--config".as_ref(),
        cfg.as_os_str(),
        "--run-dir".as_ref(),
        tmp.path().join("run2").as_os_str(),
    ]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("missing.txt") && stderr(&o).contains("python-docs"),
        "{}",
        stderr(&o)
    );
    rt.block_on(async {
        let c = connect(&addr, &good, PROTOCOL_VERSION).await.unwrap();
        assert!(!c.status(tarpc::context::current()).await.unwrap().loaded);
    });
}

#[test]
fn a_worker_that_hangs_past_its_deadline_is_treated_as_lost() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    // Heartbeats would notice a stopped process too; give them a long timeout so that
    // the evaluation deadline is what catches it. The deadline must be well above what a
    // healthy evaluation takes: a trial here (8 copies of the data, a debug build, one
    // thread) takes about 6 s on a 2-core machine, and a 6 s deadline made the healthy
    // worker miss it too, so the run never finished.
    let (mut r, victim) = Running::start(
        tmp.path(),
        4,
        "deadline_s = 20\nheartbeat_timeout_s = 600\n",
    );
    r.w1.signal(libc::SIGSTOP);
    let (log, j) = r.finish();
    let done = done_ids(&j);
    assert_eq!(done.len(), 4);
    let retry = events(&j, "retry")
        .into_iter()
        .find(|r| r["trial"].as_u64() == Some(victim))
        .unwrap_or_else(|| panic!("no retry of trial {victim}: {log}"));
    assert!(
        retry["error"].as_str().unwrap().contains("deadline"),
        "{retry}"
    );
    assert_eq!(
        events(&j, "done")
            .iter()
            .find(|r| r["trial"].as_u64() == Some(victim))
            .unwrap()["worker"],
        r.a2.as_str()
    );
}

/// A run over four checkpoints of a trajectory scores the averages practitioners take
/// first, gives the optimiser those that are points of its space, reports the best found
/// against each, and counts none of them in its budget; a resume reads them back instead
/// of scoring them again. A window search over the same checkpoints stops once every
/// window is scored.
#[test]
fn a_search_over_a_trajectory_starts_from_its_baselines_and_reports_them() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let ckpts: Vec<String> = ["step-1800", "step-2000", "step-2200", "step-2400"]
        .iter()
        .map(|s| format!("{:?}", f.join("long").join(s)))
        .collect();
    let cfg = |kind: &str, name: &str| {
        let p = tmp.path().join(name);
        std::fs::write(
            &p,
            format!(
                "checkpoints = [{}]\n[space]\nkind = {kind:?}\n[data]\nobjective = [{:?}]\nseq_len = 128\nmax_tokens = 2048\n[search]\nmax_evals = 3\n[workers]\nlocal = 1\n[output]\nplots = false\nmerge = false\n",
                ckpts.join(", "),
                f.join("data/heldout.txt")
            ),
        )
        .unwrap();
        p
    };
    let run_dir = tmp.path().join("simplex");
    let rep = search_to_end(&cfg("simplex", "simplex.toml"), &run_dir);
    let labels: Vec<&str> = rep["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    for want in [
        "step-1800",
        "step-2400",
        "uniform average",
        "EMA 0.1",
        "EMA 0.5",
        "WMA 4",
        "last 2",
        "minus-sqrt 4",
        "best found",
    ] {
        assert!(labels.contains(&want), "{want} not in {labels:?}");
    }
    let imp = &rep["improvement"][0];
    assert!(imp["best_average"].is_string(), "{imp}");
    assert_eq!(
        done_ids(&journal(&run_dir)).len(),
        3,
        "baselines are not search trials"
    );
    let baselines: Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("baselines.json")).unwrap()).unwrap();
    let n_base = baselines.as_array().unwrap().len();
    assert_eq!(n_base, labels.len() - 1);
    let opt: Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("optimizer.json")).unwrap()).unwrap();
    assert_eq!(
        opt["priors"].as_array().unwrap().len(),
        n_base,
        "every baseline is a point of the simplex"
    );
    // No trial repeats a baseline: they are taken points.
    for t in events(&journal(&run_dir), "done") {
        let w: Vec<f64> = serde_json::from_value(t["weights"].clone()).unwrap();
        for b in baselines.as_array().unwrap() {
            let bw: Vec<f64> = serde_json::from_value(b["weights"].clone()).unwrap();
            let d: f64 = w.iter().zip(&bw).map(|(a, b)| (a - b).powi(2)).sum();
            assert!(d.sqrt() > 1e-4, "trial {t} repeats baseline {b}");
        }
    }
    // A resume reads the baselines instead of scoring them; `--json` summarises the run
    // with the documented fields (README, "Machine-readable output").
    let o = run(search(&[
        "--resume".as_ref(),
        run_dir.as_os_str(),
        "--json".as_ref(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("baselines: read from"),
        "{}",
        stderr(&o)
    );
    let s: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            support::stdout(&o)
        )
    });
    assert_eq!(s["schema_version"], 1);
    assert_eq!(report(&run_dir)["schema_version"], 1);
    assert_eq!(
        Path::new(s["report_json"].as_str().unwrap()),
        Path::new(s["run_dir"].as_str().unwrap()).join("report.json")
    );
    assert!(Path::new(s["report_md"].as_str().unwrap()).is_file());
    assert!(s["merged_model"].is_null(), "output.merge = false");
    assert_eq!(s["checkpoints"].as_array().unwrap().len(), 4);
    assert_eq!(s["evaluations"], 3);
    assert_eq!(s["failed"], 0);
    assert!(s["stop_reason"].is_string() && s["wall_seconds"].is_number());
    let best = &s["best"];
    assert_eq!(best["weights"].as_array().unwrap().len(), 4);
    let best_nll = best["mean_nll"].as_f64().unwrap();
    assert_eq!(
        best_nll,
        done_ids(&journal(&run_dir))[&best["trial"].as_u64().unwrap()]
    );
    assert_eq!(best["scores"][0]["mean_nll"].as_f64().unwrap(), best_nll);
    assert!(best["perplexity"].as_f64().unwrap() > 1.0);
    let kinds: Vec<&str> = s["baselines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), n_base);
    assert_eq!(kinds.iter().filter(|k| **k == "source").count(), 4);
    assert_eq!(kinds.iter().filter(|k| **k == "uniform").count(), 1);
    assert!(kinds
        .iter()
        .all(|k| ["source", "uniform", "average"].contains(k)));
    for b in s["baselines"].as_array().unwrap() {
        let sc = &b["scores"][0];
        assert!(sc["name"].is_string() && sc["tokens"].as_u64().unwrap() > 0);
        assert!(sc["mean_nll"].is_number() && sc["perplexity"].is_number());
    }
    let imp = &s["improvement"][0];
    for field in [
        "best_perplexity",
        "best_source_perplexity",
        "change_vs_best_source_pct",
        "uniform_perplexity",
        "change_vs_uniform_pct",
        "best_average_perplexity",
        "change_vs_best_average_pct",
    ] {
        assert!(imp[field].is_number(), "improvement.{field}: {imp}");
    }
    assert!(
        imp["dataset"].is_string()
            && imp["best_source"].is_string()
            && imp["best_average"].is_string()
    );

    // A window search: four windows, then it stops, whatever the budget.
    let run_dir = tmp.path().join("window");
    let p = cfg("window", "window.toml");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("max_evals = 3", "max_evals = 10");
    std::fs::write(&p, text).unwrap();
    let rep = search_to_end(&p, &run_dir);
    assert!(
        rep["stop_reason"]
            .as_str()
            .unwrap()
            .contains("every member of the family"),
        "{}",
        rep["stop_reason"]
    );
}

#[test]
fn group_search_writes_the_model_it_scored() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let cfg = tmp.path().join("groups.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"checkpoints = [{:?}, {:?}]
[space]
kind = "groups"
groups = ["embeddings", "attention", "mlp", "rest"]
[data]
objective = [{:?}]
seq_len = 128
[search]
max_evals = 7
[output]
plots = false
"#,
            f.join("llama/step-1250"),
            f.join("llama/step-1500"),
            f.join("data/heldout.txt"),
        ),
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    let rep = search_to_end(&cfg, &run_dir);
    let best = &rep["best"];
    assert_eq!(
        best["weights"].as_array().unwrap().len(),
        8,
        "4 groups x 2 weights"
    );
    // The merged model applies each group's weights: it scores what the search scored.
    let prov: Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("merged/ckmerge.json")).unwrap())
            .unwrap();
    assert_eq!(prov["groups"].as_array().unwrap().len(), 4);
    assert_eq!(
        eval_nll(&run_dir.join("merged")),
        best["mean_nll"].as_f64().unwrap()
    );
    // And `ckmerge verify` recomputes it per group from the sources, bit for bit.
    let o = support::ckmerge("verify", &[&run_dir.join("merged")]);
    assert!(
        o.status.success() && support::stdout(&o).contains("verified"),
        "{}{}",
        support::stdout(&o),
        stderr(&o)
    );
}

/// A model split over two worker processes (a pipeline: layer 0 on one, layer 1 and the
/// head on the other, hidden states passed between them over TCP) scores exactly what
/// one worker holding the whole model scores, with one weight vector and with per-group
/// weights, raced (early stopping) or not; and a search can use the pipeline as one
/// evaluator, with early stopping too.
#[test]
fn a_two_stage_pipeline_of_worker_processes_scores_like_one_worker() {
    let _g = serial();
    use ckmerge_common::protocol::{
        connect, DatasetSpec, EvalRequest, LoadSpec, Secret, PROTOCOL_VERSION,
    };
    let tmp = tempfile::tempdir().unwrap();
    let secret = secret_file(tmp.path(), SECRET);
    let (mut w1, a1) = worker(tmp.path(), "w1", &secret);
    let (mut w2, a2) = worker(tmp.path(), "w2", &secret);
    let (_w3, a3) = worker(tmp.path(), "w3", &secret);
    let f = fixtures();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
    let ctx = || ckmerge_common::protocol::context_with_timeout(Duration::from_secs(120));
    rt.block_on(async {
        for groups in [vec![], vec!["attention".to_string(), "rest".to_string()]] {
            let spec = LoadSpec {
                run: "test:pipeline".into(),
                checkpoints: vec![f.join("llama/step-1250"), f.join("llama/step-1500")],
                // The objective: a text and a multiple-choice task, weighted; then a text.
                datasets: vec![
                    DatasetSpec::new("heldout", vec![f.join("data/heldout.txt")]),
                    DatasetSpec {
                        name: "cloze".into(),
                        files: vec![f.join("tasks/cloze.jsonl")],
                        kind: ckmerge_common::protocol::SetKind::Task,
                    },
                    DatasetSpec::new("python-docs", vec![f.join("data/python-docs.txt")]),
                ],
                objective_sets: 2,
                // The windows and items in a raced order (early stopping), on both sides.
                window_seed: Some(7),
                window: ckmerge_common::WindowSpec {
                    seq_len: Some(128),
                    batch: Some(4),
                    ..Default::default()
                },
                groups: (!groups.is_empty())
                    .then(|| ckmerge_common::Grouping::parse(&groups).unwrap()),
                pipeline: vec![],
                stage: None,
            };
            let one = connect(&a3, &key, PROTOCOL_VERSION).await.unwrap();
            let whole = one.load(ctx(), spec.clone()).await.unwrap().unwrap();
            let head = connect(&a1, &key, PROTOCOL_VERSION).await.unwrap();
            let piped = head
                .load(
                    ctx(),
                    LoadSpec {
                        pipeline: vec![a2.clone()],
                        ..spec
                    },
                )
                .await
                .unwrap()
                .unwrap();
            assert_eq!(piped.parameters, whole.parameters);
            assert!(
                piped.info.device.contains("stage 1/2 (layers 0..1)")
                    && piped.info.device.contains("stage 2/2 (layers 1..2)"),
                "{}",
                piped.info.device
            );
            let weights = if groups.is_empty() {
                vec![vec![0.42f32, 0.58]]
            } else {
                vec![vec![0.3f32, 0.7], vec![0.6, 0.4]]
            };
            for trial in [1u64, 2] {
                let mut w = weights.clone();
                w[0].reverse(); // a second trial with other weights: both stages merge again
                let req = EvalRequest {
                    trial,
                    weights: ckmerge_common::MergeWeights::per_group(if trial == 1 {
                        weights.clone()
                    } else {
                        w
                    }),
                    all_datasets: true,
                    race: None,
                };
                let a = one.evaluate(ctx(), req.clone()).await.unwrap().unwrap();
                let b = head.evaluate(ctx(), req).await.unwrap().unwrap();
                assert_eq!(a.scores.len(), 3);
                assert!(a.scores[1].task.as_ref().unwrap().items == 48);
                for (x, y) in a.scores.iter().zip(&b.scores) {
                    assert_eq!(x.tokens, y.tokens);
                    assert_eq!(x.task, y.task, "{}: acc, acc_norm, gold_ll", x.name);
                    assert_eq!(
                        x.mean_nll.to_bits(),
                        y.mean_nll.to_bits(),
                        "{} (groups {groups:?}, trial {trial}): one worker {} vs pipeline {}",
                        x.name,
                        x.mean_nll,
                        y.mean_nll
                    );
                }
            }
            // Early stopping through the pipeline: a trial scored whole keeps every
            // window's NLL sum and item's choice NLL, and a clearly worse one raced
            // against them stops at the same look with the same estimate, bit for bit.
            let z = ckmerge_common::race::SPEND.map(|_| 2.5);
            let race = |incumbent: Vec<f64>| ckmerge_common::race::Race {
                incumbent,
                z,
                // Mostly the text, on which the first checkpoint alone is clearly worse.
                weights: vec![0.9, 0.1],
                ..ckmerge_common::race::Race::whole(Vec::new())
            };
            let per_group =
                |w: Vec<f32>| ckmerge_common::MergeWeights::per_group(vec![w; weights.len()]);
            let req = |trial, w: Vec<f32>, incumbent| EvalRequest {
                trial,
                weights: per_group(w),
                all_datasets: true,
                race: Some(race(incumbent)),
            };
            let a = one.evaluate(ctx(), req(3, vec![0.45, 0.55], vec![])).await;
            let b = head.evaluate(ctx(), req(3, vec![0.45, 0.55], vec![])).await;
            let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
            assert!(a.units.len() > 48 + 100 && a.partial.is_none() && b.partial.is_none());
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.units), bits(&b.units), "groups {groups:?}");
            assert_eq!(a.scores.len(), 3);
            for (x, y) in a.scores.iter().zip(&b.scores) {
                assert_eq!(x.mean_nll.to_bits(), y.mean_nll.to_bits(), "{}", x.name);
                assert_eq!(x.task, y.task, "{}", x.name);
            }
            let worse = req(4, vec![1.0, 0.0], a.units.clone());
            let c = one.evaluate(ctx(), worse.clone()).await.unwrap().unwrap();
            let d = head.evaluate(ctx(), worse).await.unwrap().unwrap();
            let p = c.partial.expect("the first checkpoint alone is stopped");
            assert_eq!(Some(p), d.partial, "groups {groups:?}");
            assert_eq!(bits(&c.units), bits(&d.units));
            assert!(c.scores[0].tokens < a.scores[0].tokens);
            for (x, y) in c.scores.iter().zip(&d.scores) {
                assert_eq!(x.tokens, y.tokens);
                assert_eq!(x.mean_nll.to_bits(), y.mean_nll.to_bits(), "{}", x.name);
                assert_eq!(x.task, y.task, "{}", x.name);
            }
        }
    });
    // This test's connections are a search of their own: close them, or the workers
    // (one search at a time) would refuse the coordinator below.
    drop(rt);

    // The coordinator treats the pipeline as one evaluator.
    let cfg = write_config(
        tmp.path(),
        "run.toml",
        &Cfg {
            workers: &[],
            max_evals: 4,
            copies: 1,
            extra: &format!("pipelines = [[{a1:?}, {a2:?}]]"),
        },
    );
    let run_dir = tmp.path().join("run");
    let rep = search_to_end(&cfg, &run_dir);
    let best = ppl_of(&rep, "best found");
    assert!(best < ppl_of(&rep, "step-1250").min(ppl_of(&rep, "step-1500")));
    let j = journal(&run_dir);
    assert_eq!(done_ids(&j).len(), 4);
    let pipeline = format!("{a1} > {a2}");
    assert!(events(&j, "done")
        .iter()
        .all(|r| r["worker"] == pipeline.as_str()));
    // Shutting the head down at the end shuts the whole pipeline down.
    assert!(w1.wait(Duration::from_secs(20)).success());
    assert!(w2.wait(Duration::from_secs(20)).success());

    // Workers announced in a file (as the Slurm script does), grouped two by two by
    // `workers.stages`, in the order they announced.
    let (_w4, a4) = worker(tmp.path(), "w4", &secret);
    let (_w5, a5) = worker(tmp.path(), "w5", &secret);
    let list = tmp.path().join("workers.txt");
    std::fs::write(&list, format!("{a4}\n{a5}\n")).unwrap();
    let cfg = write_config(
        tmp.path(),
        "staged.toml",
        &Cfg {
            workers: &[],
            max_evals: 6,
            copies: 1,
            extra: &format!("addresses_file = {list:?}\nstages = 2"),
        },
    );
    // With early stopping, raced through the stages; the same search on one worker (w3,
    // free again) makes the same trials with the same values and stops.
    // A multiple-choice task beside the objective: the report scores it on the sources
    // and the best, through the pipeline's stages.
    let early = |p: &Path| {
        let t = std::fs::read_to_string(p).unwrap();
        let t = t
            .replace(
                "[search]\n",
                "[search]\nearly_stop = true\nearly_stop_margin = 0.001\n",
            )
            .replace(
                "[data]\n",
                &format!(
                    "[data]\ntasks = {{ cloze = {:?} }}\n",
                    f.join("tasks/cloze.jsonl")
                ),
            );
        std::fs::write(p, t).unwrap();
    };
    early(&cfg);
    let run_dir = tmp.path().join("staged");
    search_to_end(&cfg, &run_dir);
    let j = journal(&run_dir);
    // Six trials, and a leader's confirmation where one is left at the end.
    let confirmations = events(&j, "done")
        .iter()
        .filter(|d| d["continues"].is_u64())
        .count();
    assert!(confirmations <= 1);
    assert_eq!(done_ids(&j).len(), 6 + confirmations);
    let pipeline = format!("{a4} > {a5}");
    assert!(events(&j, "done")
        .iter()
        .all(|r| r["worker"] == pipeline.as_str()));
    let one = write_config(
        tmp.path(),
        "one.toml",
        &Cfg {
            workers: std::slice::from_ref(&a3),
            max_evals: 6,
            copies: 1,
            extra: "",
        },
    );
    early(&one);
    let one_dir = tmp.path().join("one");
    search_to_end(&one, &one_dir);
    assert_eq!(trial_key(&j), trial_key(&journal(&one_dir)));
    assert!(events(&j, "done").iter().any(|d| d["partial"].is_object()));
    let refs = |dir: &Path| report(dir)["references"].clone();
    let (piped, whole) = (refs(&run_dir), refs(&one_dir));
    assert_eq!(piped, whole);
    let cloze = &piped[0]["scores"][2];
    assert!(
        cloze["name"] == "cloze" && cloze["task"]["items"] == 48,
        "{piped}"
    );
}

/// The journal as far as it is whole: a coordinator killed mid-write may leave a torn
/// last line (the next resume cuts it off).
fn journal_whole_lines(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("trials.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Issue 14, fault injection: a search under random kills (-9) of its workers and of its
/// coordinator, each followed by a replacement worker or a resume, keeps the journal's
/// invariants: a completed trial is never lost, never changes, and is never completed
/// twice; the run can always be resumed to its end. CKMERGE_CHAOS_SEED and
/// CKMERGE_CHAOS_ROUNDS run other or more rounds (CI runs the default: 4 rounds, seed 1).
#[test]
fn chaos_kills_of_workers_and_coordinator_lose_and_repeat_nothing() {
    use rand::{Rng, SeedableRng};
    let _g = serial();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let seed = env("CKMERGE_CHAOS_SEED", 1);
    let rounds = env("CKMERGE_CHAOS_ROUNDS", 4);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let secret = secret_file(tmp.path(), SECRET);
    let workers_file = tmp.path().join("workers.txt");
    let mut started = 0;
    let mut start_worker = |file: &Path| -> Proc {
        started += 1;
        let (p, a) = worker(tmp.path(), &format!("w{started}"), &secret);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .unwrap();
        std::io::Write::write_all(&mut f, format!("{a}\n").as_bytes()).unwrap();
        p
    };
    let mut workers = vec![start_worker(&workers_file), start_worker(&workers_file)];
    let max_evals = 10;
    let cfg = write_config(
        tmp.path(),
        "run.toml",
        &Cfg {
            workers: &[],
            max_evals,
            copies: 2,
            extra: &format!("addresses_file = {workers_file:?}\nheartbeat_timeout_s = 3\n"),
        },
    );
    let run_dir = tmp.path().join("run");
    let start_coord = |resume: bool| {
        let mut c = if resume {
            search(&["--resume".as_ref(), run_dir.as_os_str()])
        } else {
            search(&[
                "--config".as_ref(),
                cfg.as_os_str(),
                "--run-dir".as_ref(),
                run_dir.as_os_str(),
            ])
        };
        Proc(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut coord = start_coord(false);
    // Every completed trial seen so far: id -> objective.
    let mut seen: BTreeMap<u64, f64> = BTreeMap::new();
    let check = |seen: &mut BTreeMap<u64, f64>, what: &str| {
        let now = done_ids(&journal_whole_lines(&run_dir)); // panics on a trial done twice
        for (id, v) in seen.iter() {
            assert_eq!(
                now.get(id),
                Some(v),
                "seed {seed}, {what}: completed trial {id} lost or changed"
            );
        }
        *seen = now;
    };
    for round in 0..rounds {
        let before = seen.len();
        let progressed = wait_for("a trial to complete", Duration::from_secs(180), || {
            let n = done_ids(&journal_whole_lines(&run_dir)).len();
            let exited = coord.0.try_wait().unwrap().is_some();
            (n > before || exited).then_some(n > before)
        });
        check(&mut seen, &format!("round {round}"));
        if !progressed || seen.len() >= max_evals {
            break; // the run finished
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..600)));
        match rng.gen_range(0..3) {
            0 | 1 => {
                // `workers` holds the live ones; the victim is replaced by a new worker.
                let mut victim = workers.swap_remove(rng.gen_range(0..workers.len()));
                eprintln!("chaos seed {seed} round {round}: kill -9 of a worker");
                victim.signal(libc::SIGKILL);
                victim.wait(Duration::from_secs(10));
                workers.push(start_worker(&workers_file));
            }
            _ => {
                eprintln!("chaos seed {seed} round {round}: kill -9 of the coordinator");
                coord.signal(libc::SIGKILL);
                coord.wait(Duration::from_secs(10));
                check(
                    &mut seen,
                    &format!("round {round}, after killing the coordinator"),
                );
                coord = start_coord(true);
            }
        }
    }
    // To the end: the last coordinator, or a resume if it is gone.
    let status = coord.wait(Duration::from_secs(300));
    if !status.success() {
        let o = run(search(&["--resume".as_ref(), run_dir.as_os_str()]));
        assert!(
            o.status.success(),
            "seed {seed}: the final resume failed: {}",
            stderr(&o)
        );
    }
    check(&mut seen, "at the end");
    assert_eq!(seen.len(), max_evals, "seed {seed}");
}

/// Issue 14, fault injection with a full disk: the run directory's filesystem fills up
/// mid-search. The coordinator stops with an error naming the journal; once space is
/// freed, a resume loses no completed trial, repeats none, and runs to the end. Needs a
/// small filesystem of its own: a tmpfs, which only root can mount (CI runs as root);
/// elsewhere the test says it skipped.
#[test]
fn a_full_disk_stops_the_search_and_a_resume_loses_nothing() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    let test = "a_full_disk_stops_the_search_and_a_resume_loses_nothing";
    let Some(_disk) = support::SmallDisk::mount(&mnt, "4m", test) else {
        return;
    };
    let cfg = write_config(
        tmp.path(),
        "run.toml",
        &Cfg {
            workers: &[],
            max_evals: 10,
            copies: 2,
            extra: "local = 1\n",
        },
    );
    let run_dir = mnt.join("run");
    let mut coord = Proc(
        search(&[
            "--config".as_ref(),
            cfg.as_os_str(),
            "--run-dir".as_ref(),
            run_dir.as_os_str(),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("coord.log")).unwrap())
        .spawn()
        .unwrap(),
    );
    wait_for("three trials done", Duration::from_secs(120), || {
        (done_ids(&journal_whole_lines(&run_dir)).len() >= 3).then_some(())
    });
    // Fill the filesystem to the last byte.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        let _ = std::io::Write::write_all(&mut f, &[0u8]);
    }
    let status = coord.wait(Duration::from_secs(120));
    let log = std::fs::read_to_string(tmp.path().join("coord.log")).unwrap();
    assert!(
        !status.success(),
        "the search finished on a full disk: {log}"
    );
    assert!(
        log.contains("appending to the journal") && log.contains("No space left on device"),
        "{log}"
    );
    let before = done_ids(&journal_whole_lines(&run_dir));

    std::fs::remove_file(&filler).unwrap();
    let o = run(search(&["--resume".as_ref(), run_dir.as_os_str()]));
    assert!(o.status.success(), "{}", stderr(&o));
    let after = done_ids(&journal(&run_dir)); // whole lines only now; no trial done twice
    for (id, v) in &before {
        assert_eq!(
            after.get(id),
            Some(v),
            "completed trial {id} lost or changed"
        );
    }
    assert_eq!(after.len(), 10);
}

#[test]
fn a_search_on_a_weighted_mixture_of_a_task_and_text_minimises_what_it_reports() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let cfg = tmp.path().join("mix.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"checkpoints = [{:?}, {:?}]
[space]
kind = "lambda"
[data]
objective = {{ heldout = 3, cloze = 1 }}
extra = {{ heldout = [{:?}], python-docs = [{:?}] }}
tasks = {{ cloze = {:?} }}
seq_len = 128
[search]
max_evals = 4
[output]
plots = false
"#,
            f.join("llama/step-1250"),
            f.join("llama/step-1500"),
            f.join("data/heldout.txt"),
            f.join("data/python-docs.txt"),
            f.join("tasks/cloze.jsonl"),
        ),
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    let rep = search_to_end(&cfg, &run_dir);

    // Each trial's value is the documented mixture of its sets' own scores, which the
    // journal keeps: 1/4 of the task's choice NLL and 3/4 of the text's mean NLL.
    let j = journal(&run_dir);
    let done = events(&j, "done");
    assert_eq!(done.len(), 4);
    for d in &done {
        let s = d["scores"].as_array().unwrap();
        assert_eq!(s.len(), 2, "the objective's two sets: {d}");
        assert_eq!(
            (s[0]["name"].as_str(), s[1]["name"].as_str()),
            (Some("cloze"), Some("heldout"))
        );
        let acc = s[0]["task"]["acc"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&acc) && s[0]["task"]["items"] == 48,
            "{d}"
        );
        assert!(s[1]["task"].is_null());
        let (c, h) = (
            s[0]["mean_nll"].as_f64().unwrap(),
            s[1]["mean_nll"].as_f64().unwrap(),
        );
        let mut want = 0.0;
        want += 0.25 * c;
        want += 0.75 * h;
        assert_eq!(d["mean_nll"].as_f64().unwrap(), want, "{d}");
    }
    let objective: Vec<(String, f64)> = rep["objective"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["set"].as_str().unwrap().to_string(),
                o["weight"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        objective,
        [("cloze".to_string(), 0.25), ("heldout".to_string(), 0.75)]
    );

    // The best is the journal's lowest value; scored again for the report it gives the
    // same value, and every reference has all three sets, the task with its accuracies.
    let best_value = done_ids(&j).values().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(rep["best"]["mean_nll"].as_f64().unwrap(), best_value);
    let refs = rep["references"].as_array().unwrap();
    for r in refs {
        let names: Vec<&str> = r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["cloze", "heldout", "python-docs"], "{r}");
        assert!(r["scores"][0]["task"]["acc_norm"].is_f64(), "{r}");
        assert!(r["objective"].is_f64(), "{r}");
    }
    let best = refs.iter().find(|r| r["label"] == "best found").unwrap();
    assert_eq!(best["objective"].as_f64().unwrap(), best_value);
    // No reference the search could reach beats the best it found (both ends are
    // points of the lambda space, and were the first two trials).
    for r in refs {
        assert!(r["objective"].as_f64().unwrap() >= best_value, "{r}");
    }

    // `ckmerge eval` of the merged model gives the same task and text scores bit for
    // bit: the worker's path is the one the lm-evaluation-harness goldens test.
    let o = Command::new(bin())
        .arg("eval")
        .arg(run_dir.join("merged"))
        .arg("--data")
        .arg(f.join("data/heldout.txt"))
        .arg("--task")
        .arg(f.join("tasks/cloze.jsonl"))
        .args(["--seq-len", "128", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let bs = &best["scores"];
    assert_eq!(v["tasks"][0]["choice_nll"], bs[0]["mean_nll"]);
    assert_eq!(v["tasks"][0]["acc"], bs[0]["task"]["acc"]);
    assert_eq!(v["tasks"][0]["acc_norm"], bs[0]["task"]["acc_norm"]);
    assert_eq!(v["datasets"][0]["mean_nll"], bs[1]["mean_nll"]);

    let md = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(
        md.contains("objective: 0.25 × cloze (choice NLL) + 0.75 × heldout (mean NLL)")
            && md.contains("acc / acc_norm / choice NLL")
            && md.contains("| exp(objective) | objective |"),
        "{md}"
    );
}

/// A run config over the 12 checkpoints of the fixture `long/` trajectory, simplex space,
/// held-out prose as the objective.
fn long_config(dir: &Path, name: &str, max_evals: usize, early_stop: bool) -> PathBuf {
    let data = format!("objective = [{:?}]", fixtures().join("data/heldout.txt"));
    long_config_with(dir, name, max_evals, early_stop, &data)
}

/// [`long_config`] with `data` as its `[data]` table's lines (besides `seq_len`).
fn long_config_with(
    dir: &Path,
    name: &str,
    max_evals: usize,
    early_stop: bool,
    data: &str,
) -> PathBuf {
    let f = fixtures();
    let ckpts: Vec<String> = (1..=12)
        .map(|i| format!("{:?}", f.join(format!("long/step-{}", i * 200))))
        .collect();
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            r#"checkpoints = [{}]
[space]
kind = "simplex"
[data]
{data}
seq_len = 128
[search]
max_evals = {max_evals}
early_stop = {early_stop}
[output]
plots = false
merge = false
"#,
            ckpts.join(", "),
        ),
    )
    .unwrap();
    p
}

#[test]
fn early_stopping_scores_fewer_tokens_keeps_the_best_and_resumes_exactly() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let raced = tmp.path().join("raced");
    let rep_full = search_to_end(&long_config(tmp.path(), "full.toml", 12, false), &full);
    let rep = search_to_end(&long_config(tmp.path(), "raced.toml", 12, true), &raced);

    // Some trials stopped early; each scored at most half the set (the last look); the
    // best is a full evaluation (see `check_raced`).
    let j = journal(&raced);
    let whole = rep_full["trials"][0]["tokens"].as_u64().unwrap();
    let stopped = check_raced(&j, baseline_best(&rep), 0.0, Some(whole), 100);
    assert!(stopped >= 3, "{stopped} stopped");
    // The per-window sums stay in the journal, out of the report.
    assert!(rep["trials"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["units"].is_null()));
    assert_eq!(rep["stopped_early"].as_u64().unwrap(), stopped as u64);
    let (t_full, t_raced) = (
        rep_full["scored_tokens"].as_u64().unwrap(),
        rep["scored_tokens"].as_u64().unwrap(),
    );
    assert!(t_raced < t_full, "{t_raced} vs {t_full}");
    // The best is a full evaluation, and as good as without early stopping (0.1 %).
    assert!(rep["best"]["partial"].is_null());
    let (b, b_full) = (
        rep["best"]["mean_nll"].as_f64().unwrap(),
        rep_full["best"]["mean_nll"].as_f64().unwrap(),
    );
    assert!(b < b_full * 1.001, "{b} vs {b_full}");

    // Killed with 6 trials done and resumed, the run makes the same trials with the same
    // values: estimates, their variances and the leaders are replayed exactly.
    assert_killed_resumes_to(
        &long_config(tmp.path(), "raced.toml", 12, true),
        &tmp.path().join("killed"),
        6,
        &j,
    );
}

/// The best value of the references other than the best found (the baselines, which
/// trials race from); infinite without any.
fn baseline_best(rep: &Value) -> f64 {
    rep["references"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] != "best")
        .map(|r| r["objective"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min)
}

/// Checks the trials of a raced run's journal `j` in order, from `incumbent` (the best
/// baseline's value; infinite without baselines): a trial scored whole has every unit
/// (more than `min_units`) and `whole` tokens where given, and may make the incumbent;
/// one stopped as not better has its lower bound above `-margin` and, tested against the
/// incumbent, its estimate above `incumbent - margin`, and keeps no units; one stopped as
/// better (the leader) has its upper bound below zero and keeps the units it scored.
/// No leader is left at the end: the last was scored whole (its confirmation) or passed
/// by a trial scored whole. Returns how many trials stopped.
fn check_raced(
    j: &[Value],
    mut incumbent: f64,
    margin: f64,
    whole: Option<u64>,
    min_units: usize,
) -> usize {
    let done = events(j, "done");
    let first_incumbent = incumbent;
    let mut stopped = 0;
    for d in &done {
        let v = d["mean_nll"].as_f64().unwrap();
        let p = &d["partial"];
        if p.is_object() {
            stopped += 1;
            if let Some(whole) = whole {
                assert!(d["tokens"].as_u64().unwrap() <= whole / 2, "{d}");
            }
            // Raced against a leader: the record names it.
            if p["against_leader"] == true {
                assert!(d["raced"].is_u64(), "{d}");
            }
            if p["better"] == true {
                assert!(p["upper_bound"].as_f64().unwrap() < 0.0, "{d}");
                assert_eq!(
                    d["units"].as_array().unwrap().len() as u64,
                    p["scored_units"].as_u64().unwrap(),
                    "a leader keeps its units: {d}"
                );
                if p["against_leader"] == false {
                    assert!(
                        v < incumbent,
                        "{d}: a leader above the incumbent {incumbent}"
                    );
                }
            } else {
                assert!(p["lower_bound"].as_f64().unwrap() > -margin, "{d}");
                if p["against_leader"] == false {
                    assert!(
                        v > incumbent - margin,
                        "{d}: below the incumbent {incumbent}"
                    );
                }
                assert!(d["units"].is_null(), "{d}");
            }
        } else {
            // A leader's confirmation that went on from the leader's windows scored the
            // rest of them.
            let leader = d["continues"]
                .as_u64()
                .map(|id| *done.iter().find(|l| l["trial"] == id).expect("its leader"));
            if let Some(l) = leader {
                assert!(
                    l["partial"]["better"] == true && l["weights"] == d["weights"],
                    "{d}"
                );
            }
            if let Some(whole) = whole {
                let before = leader.map_or(0, |l| l["tokens"].as_u64().unwrap());
                assert_eq!(d["tokens"].as_u64().unwrap() + before, whole, "{d}");
            }
            assert!(
                d["units"].as_array().unwrap().len() > min_units,
                "per-unit values kept: {d}"
            );
            incumbent = incumbent.min(v);
        }
    }
    // The leader, replayed as the coordinator keeps it (one stopped as better than the
    // leader it raced, named in `raced`, leads whatever its estimate; with no leader, one
    // leads only below the incumbent; one scored whole after racing it ends it only where
    // shown better than it on its units):
    // a leader left when the budget is spent is scored whole (the same weights, a full
    // record), which ends it.
    let mut leader: Option<&Value> = None;
    let mut incumbent = first_incumbent;
    for d in &done {
        let v = d["mean_nll"].as_f64().unwrap();
        let lead = leader.map(|l| l["mean_nll"].as_f64().unwrap());
        if d["partial"]["better"] == true {
            let beat = leader.is_some_and(|l| {
                d["partial"]["against_leader"] == true && d["raced"] == l["trial"]
            });
            if beat || lead.map_or(v < incumbent, |l| v < l) {
                leader = Some(d);
            }
        } else if d["partial"].is_null() {
            // A trial scored whole ends the leader as its confirmation, when it raced it
            // and is shown better than it paired on its units, or below its estimate when
            // it did not race it. One that raced a leader says how it compares with it.
            if d["raced"].is_u64() {
                let v = &d["versus_leader"];
                let (diff, upper) = (v["difference"].as_f64(), v["upper_bound"].as_f64());
                assert!(diff.unwrap() < upper.unwrap(), "{d}");
            }
            let ends = |l: &Value| {
                l["weights"] == d["weights"]
                    || match d["raced"] == l["trial"] {
                        true => d["versus_leader"]["upper_bound"].as_f64().unwrap() < 0.0,
                        false => v < lead.unwrap(),
                    }
            };
            if leader.is_some_and(ends) {
                leader = None;
            }
            incumbent = incumbent.min(v);
        }
    }
    assert!(leader.is_none(), "a leader left unconfirmed: {leader:?}");
    stopped
}

/// Runs `cfg` into `run_dir`, kills the coordinator (-9) once `k` trials are done and the
/// next is in flight (its snapshot written), resumes it, and checks that it made the
/// trials of the straight run journalled in `straight`: the same weights, values and
/// stops, in order.
fn assert_killed_resumes_to(cfg: &Path, run_dir: &Path, k: usize, straight: &[Value]) {
    let mut coord = start_search(cfg, run_dir);
    wait_for(
        &format!("{k} trials done and one in flight"),
        Duration::from_secs(300),
        || {
            let in_flight = |j: &[Value]| {
                events(j, "done").len() >= k && j.last().is_some_and(|r| r["event"] == "issued")
            };
            // Whole lines only: a record may be half written while the search runs.
            if !in_flight(&journal_whole_lines(run_dir)) {
                return None;
            }
            coord.signal(libc::SIGSTOP);
            if in_flight(&journal_whole_lines(run_dir)) {
                return Some(());
            }
            coord.signal(libc::SIGCONT);
            None
        },
    );
    coord.signal(libc::SIGKILL);
    coord.wait(Duration::from_secs(10));
    let o = run(search(&["--resume".as_ref(), run_dir.as_os_str()]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(trial_key(&journal(run_dir)), trial_key(straight));
}

/// What must match between two runs that make the same trials: each completed trial's
/// weights, value and early stop, in order.
fn trial_key(j: &[Value]) -> Vec<(Value, Value, Value)> {
    events(j, "done")
        .iter()
        .map(|d| {
            (
                d["weights"].clone(),
                d["mean_nll"].clone(),
                d["partial"].clone(),
            )
        })
        .collect()
}

/// Early stopping on a weighted mixture of a task and a text (the 12-checkpoint simplex):
/// a stopped trial's value is the mixture of its sets' estimates, which the journal keeps;
/// the fixture task (48 items, fewer than a task's looks need) is scored whole and only
/// the text is sampled; a resumed run makes the same trials with the same values.
#[test]
fn early_stopping_races_a_mixture_of_a_task_and_text_and_resumes_exactly() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let data = format!(
        "objective = {{ heldout = 3, cloze = 1 }}\nextra = {{ heldout = [{:?}] }}\ntasks = {{ cloze = {:?} }}",
        f.join("data/heldout.txt"),
        f.join("tasks/cloze.jsonl"),
    );
    let config =
        |name: &str, max_evals: usize| long_config_with(tmp.path(), name, max_evals, true, &data);
    let raced = tmp.path().join("raced");
    let rep = search_to_end(&config("raced.toml", 10), &raced);
    let j = journal(&raced);
    let done = events(&j, "done");
    for d in &done {
        let s = d["scores"].as_array().unwrap();
        assert_eq!(s[0]["name"], "cloze", "{d}");
        assert_eq!(s[0]["task"]["items"], 48, "the task is scored whole: {d}");
        let want =
            0.25 * s[0]["mean_nll"].as_f64().unwrap() + 0.75 * s[1]["mean_nll"].as_f64().unwrap();
        let v = d["mean_nll"].as_f64().unwrap();
        assert!((v - want).abs() < 1e-12, "{d}");
        if d["partial"]["better"] == true {
            // A leader: the 48 items, then the windows it scored.
            assert_eq!(d["partial"]["scored"][0], 48, "{d}");
        }
    }
    // 48 items, then the text's windows.
    let stopped = check_raced(&j, baseline_best(&rep), 0.0, None, 48 + 100);
    assert!(stopped >= 2, "{stopped} of {} stopped", done.len());
    assert_eq!(rep["stopped_early"].as_u64().unwrap(), stopped as u64);
    assert!(rep["best"]["partial"].is_null());

    // Killed with 5 trials done and resumed: the same trials, the same values.
    assert_killed_resumes_to(&config("raced.toml", 10), &tmp.path().join("killed"), 5, &j);
}

/// A 1-D search between the last two llama checkpoints, windows of 128, with `data` as
/// its `[data]` table (the held-out prose where empty) and `search` as its `[search]`
/// table; no plots, no merge.
fn llama_lambda_config(dir: &Path, name: &str, data: &str, search: &str) -> PathBuf {
    let f = fixtures();
    let data = match data {
        "" => format!("objective = [{:?}]", f.join("data/heldout.txt")),
        d => d.to_string(),
    };
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            r#"checkpoints = [{:?}, {:?}]
[space]
kind = "lambda"
[data]
{data}
seq_len = 128
[search]
{search}
[output]
plots = false
merge = false
"#,
            f.join("llama/step-1250"),
            f.join("llama/step-1500"),
        ),
    )
    .unwrap();
    p
}

/// Leaders: on a 1-D search of three trials between the last two llama checkpoints, the
/// third (inside, far better than either end) stops early as clearly better than the best
/// end; the budget is then spent with a leader left, which is scored whole: a trial of
/// its own that goes on from the leader's windows, and the best found.
#[test]
fn a_leader_left_at_the_end_is_scored_whole_from_where_it_stopped() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let budget = "max_evals = 3\nearly_stop = true";
    let cfg = llama_lambda_config(tmp.path(), "run.toml", "", budget);
    let run_dir = tmp.path().join("run");
    let rep = search_to_end(&cfg, &run_dir);
    let j = journal(&run_dir);
    let done = events(&j, "done");
    assert_eq!(done.len(), 4, "three trials and a confirmation");
    let (leader, confirm) = (done[2], done[3]);
    assert_eq!(leader["partial"]["better"], true, "{leader}");
    assert_eq!(confirm["continues"], leader["trial"], "{confirm}");
    assert_eq!(confirm["weights"], leader["weights"]);
    let whole = done[0]["tokens"].as_u64().unwrap();
    check_raced(&j, f64::INFINITY, 0.0, Some(whole), 100);
    assert_eq!(rep["best"]["trial"], confirm["trial"]);
    assert!(rep["best"]["partial"].is_null());
    // The estimate was near the full value.
    let (est, full) = (
        leader["mean_nll"].as_f64().unwrap(),
        confirm["mean_nll"].as_f64().unwrap(),
    );
    let se = leader["partial"]["std_error"].as_f64().unwrap();
    assert!((est - full).abs() < 4.0 * se, "{est} vs {full} (se {se})");
    // The leader and its confirmation scored one whole trial between them.
    assert!(rep["scored_tokens"].as_u64().unwrap() <= 3 * whole);

    // Extending the finished run to 5 evaluations makes 2 more trials: the confirmation
    // was one beyond the budget and does not count towards it.
    let o = run(search(&[
        "--resume".as_ref(),
        run_dir.as_os_str(),
        "--max-evals".as_ref(),
        "5".as_ref(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let j = journal(&run_dir);
    let done = events(&j, "done");
    let proposed = done.iter().filter(|d| d["continues"].is_null()).count();
    assert_eq!(proposed, 5, "{} done records", done.len());
    check_raced(&j, f64::INFINITY, 0.0, Some(whole), 100);

    // The same with a task in the objective: the leader keeps its items' choice results,
    // and its confirmation goes on from them to the task's full scores.
    let f = fixtures();
    let data = format!(
        "objective = {{ heldout = 3, cloze = 1 }}\nextra = {{ heldout = [{:?}] }}\ntasks = {{ cloze = {:?} }}",
        f.join("data/heldout.txt"),
        f.join("tasks/cloze.jsonl"),
    );
    let cfg = llama_lambda_config(tmp.path(), "mix.toml", &data, budget);
    let run_dir = tmp.path().join("mix");
    let rep = search_to_end(&cfg, &run_dir);
    let done = events(&journal(&run_dir), "done")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(done.len(), 4, "three trials and a confirmation");
    let (leader, confirm) = (&done[2], &done[3]);
    assert_eq!(leader["partial"]["better"], true, "{leader}");
    assert!(!leader["partial"]["choices"].as_array().unwrap().is_empty());
    assert_eq!(confirm["continues"], leader["trial"], "{confirm}");
    assert_eq!(confirm["scores"][0]["task"]["items"], 48, "{confirm}");
    assert_eq!(rep["best"]["trial"], confirm["trial"]);
}

/// `search.early_stop_margin`: on a 1-D search between the last two llama checkpoints,
/// where trials near the optimum differ from the incumbent by less than any look can
/// decide, a margin of 0.001 nats stops trials that cannot improve the incumbent by more
/// than it (lower bound between -margin and 0), never one the test shows may improve it by
/// more, and the best found stays within the margin of the same search scored whole.
#[test]
fn an_early_stop_margin_stops_trials_that_cannot_improve_by_more_than_it() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = |name: &str, stop: &str| {
        llama_lambda_config(tmp.path(), name, "", &format!("max_evals = 8\n{stop}"))
    };
    let margin = 0.001;
    let rep_full = search_to_end(&config("full.toml", ""), &tmp.path().join("full"));
    let raced = tmp.path().join("raced");
    let rep = search_to_end(
        &config(
            "raced.toml",
            &format!("early_stop = true\nearly_stop_margin = {margin}"),
        ),
        &raced,
    );
    let done = journal(&raced);
    let whole = rep_full["trials"][0]["tokens"].as_u64();
    check_raced(&done, f64::INFINITY, margin, whole, 100);
    let bounds: Vec<f64> = events(&done, "done")
        .iter()
        .filter(|d| d["partial"]["better"] == false)
        .filter_map(|d| d["partial"]["lower_bound"].as_f64())
        .collect();
    assert!(
        bounds.iter().any(|&b| b <= 0.0),
        "no trial was stopped by the margin alone: {bounds:?}"
    );
    // The first trials walk into the basin, each clearly better than the last: some
    // stopped as leaders instead of being scored whole.
    assert!(
        events(&done, "done")
            .iter()
            .any(|d| d["partial"]["better"] == true),
        "no leader"
    );
    let (b, b_full) = (
        rep["best"]["mean_nll"].as_f64().unwrap(),
        rep_full["best"]["mean_nll"].as_f64().unwrap(),
    );
    assert!(b <= b_full + margin, "{b} vs {b_full}");
    assert!(rep["scored_tokens"].as_u64() < rep_full["scored_tokens"].as_u64());
    // The report says which test stopped them.
    assert_eq!(rep["early_stop"]["margin"], margin);
    assert!(rep_full["early_stop"].is_null());
    let md = std::fs::read_to_string(raced.join("report.md")).unwrap();
    assert!(
        md.contains("stopped early (alpha 0.01, margin 0.001"),
        "{md}"
    );
}
