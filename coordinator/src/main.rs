//! `ckmerge`: one binary, one subcommand per role. `main` parses and checks the
//! arguments completely, calls the library, and maps errors to a message and an exit
//! code (1 for a failed run, 2 for bad usage, 130 when interrupted).
//!
//! What is here is the command line alone: the clap definitions, dispatch, and how results
//! are printed. The work is in the libraries: `ckmerge_coordinator::search::run`,
//! `ckmerge_worker::{merge_to_dir, eval::Evaluator, listen::run}`, and
//! `ckmerge_common::weights::WeightArgs` (the weight flags and their checks).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ckmerge_common::protocol::DatasetSpec;
use ckmerge_common::size::{human_bytes, parse_size};
use ckmerge_common::weights::WeightArgs;
use ckmerge_common::DType;
use ckmerge_worker::eval::{dataset_name, EvalOptions, Evaluator};
use ckmerge_worker::merge::MergePart;
use ckmerge_worker::{merge_to_dir, MergeRequest, Progress};
use clap::{Args, CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ckmerge",
    version,
    propagate_version = true,
    about = "Merge checkpoints of one LLM training run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the weighted merge sum_i w_i * theta_i of checkpoints as a new model directory.
    ///
    /// Streams tensor by tensor, so memory does not grow with the model. The output
    /// appears atomically (built beside DIR, then renamed) and no input is ever written.
    Merge(MergeArgs),
    /// Held-out perplexity of a checkpoint, or of a weighted merge of several (merged in
    /// memory, never written).
    Eval(EvalArgs),
    /// Search the merge weights that minimise held-out perplexity (Bayesian optimisation
    /// over in-process workers, or as the coordinator of `ckmerge worker` processes), then
    /// write the merged model of the best weights and a report into the run directory.
    Search(SearchCliArgs),
    /// Serve merge-and-evaluate requests to a search coordinator over TCP.
    Worker(WorkerArgs),
    /// Check a merged model: its shards against the SHA-256 recorded when they were
    /// written, and every tensor against the merge recomputed from the sources.
    Verify(VerifyArgs),
    /// Print a shell completion script to standard output.
    ///
    /// For example: `ckmerge completions bash > ~/.local/share/bash-completion/completions/ckmerge`,
    /// `ckmerge completions zsh > ~/.zfunc/_ckmerge`,
    /// `ckmerge completions fish > ~/.config/fish/completions/ckmerge.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages, ckmerge.1 and one per subcommand (ckmerge-search.1, ...),
    /// into DIR (created if missing), for `man -M` or a MANPATH directory's man1/.
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// GPU merge bandwidth against a device-to-device copy, or the flash-attention
    /// variants (scripts/gpu-check.sh).
    #[command(hide = true)]
    GpuBench(GpuBenchArgs),
}

#[derive(Args)]
struct GpuBenchArgs {
    /// Model size in bytes (suffixes KB, MB, GB).
    #[arg(long, default_value = "2GB", value_parser = parse_size)]
    bytes: u64,
    /// Numbers of sources to measure, comma-separated.
    #[arg(long, default_value = "2,4", value_delimiter = ',')]
    sources: Vec<usize>,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Time the flash-attention variants instead (bf16) on WINDOWS x SEQ tokens of
    /// HEADS/KV_HEADS heads of size HD (64 or 128).
    #[arg(
        long,
        value_name = "WINDOWS,SEQ,HEADS,KV_HEADS,HD",
        value_delimiter = ','
    )]
    attention: Option<Vec<usize>>,
}

#[derive(Args)]
struct SearchCliArgs {
    /// The search config (TOML; paths in it are relative to the file).
    #[arg(long, value_name = "FILE", required_unless_present = "resume")]
    config: Option<PathBuf>,

    /// Where the run's journal, report and merged model go.
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    run_dir: Option<PathBuf>,

    /// Continue the run in RUN_DIR from its journal: completed trials are kept, trials
    /// that were in flight are issued again. --config may change the budget and workers.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "run_dir")]
    resume: Option<PathBuf>,

    /// Discard an earlier run in --run-dir.
    #[arg(long)]
    force: bool,

    /// File holding the run's shared secret (else the CKMERGE_SECRET variable); needed
    /// with remote workers only.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,

    /// Override search.max_evals (for example to extend a resumed run).
    #[arg(long)]
    max_evals: Option<usize>,

    /// Override workers.addresses_file: a file of worker addresses that workers append to
    /// as they start (`ckmerge worker --announce FILE`); used by the Slurm script.
    #[arg(long, value_name = "FILE")]
    workers_file: Option<PathBuf>,

    /// Override workers.stages: group the workers into pipelines of N stages, in the
    /// order they are listed or announced.
    #[arg(long, value_name = "N")]
    stages: Option<usize>,

    /// Override workers.local: in-process workers when no worker addresses are given.
    #[arg(long)]
    local_workers: Option<usize>,

    /// Threads for in-process workers and the final merge (default: all cores).
    #[arg(long)]
    threads: Option<usize>,

    /// GPUs of the in-process workers (used when the config lists no worker addresses):
    /// `auto` (every visible GPU, else the CPU, said in the log), `all`, CUDA ordinals
    /// like `0,1`, or `none`. Remote workers choose their own (`ckmerge worker --gpus`).
    #[arg(long, default_value = "auto")]
    gpus: String,

    /// Print one JSON object when the run ends instead of the text summary (fields in
    /// README.md, "Machine-readable output"; logs stay on standard error).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct WorkerArgs {
    /// Address to listen on (port 0: any free port; see --announce).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,

    /// Append this worker's address (host:port) to FILE once it listens, for a
    /// coordinator's `workers.addresses_file`.
    #[arg(long, value_name = "FILE")]
    announce: Option<PathBuf>,

    /// Host name or IP to announce instead of the listening IP (needed with 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,

    /// File holding the run's shared secret (else the CKMERGE_SECRET variable).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,

    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,

    /// Where to hold the model: `auto` (every visible GPU, else the CPU, said in the
    /// log; work whose GPU path has not yet run on a GPU, such as tasks, loads on the
    /// CPU), `all`, a list of CUDA ordinals (`0,1`), or `none` (CPU).
    #[arg(long, default_value = "auto")]
    gpus: String,

    /// Benchmark mode: read nothing, make every evaluation sleep MS and return a fixed
    /// smooth function of the weights (to measure scheduling overhead; never for a search
    /// whose result matters).
    #[arg(long, value_name = "MS", hide = true)]
    bench_fixed_cost_ms: Option<u64>,
}

#[derive(Args)]
struct EvalArgs {
    /// Hugging Face model directories, or `org/name@revision` in the local Hugging Face
    /// cache; several need --weights, --lambda or an average (--ema, --wma, --window,
    /// --minus-sqrt; checkpoints oldest first).
    #[arg(required = true, value_name = "CKPT")]
    checkpoints: Vec<PathBuf>,

    #[command(flatten)]
    w: WeightArgs,

    /// Held-out data, one data set: .txt, .jsonl ("text" field), .npy or .bin token
    /// arrays, or directories of these.
    #[arg(long, required_unless_present = "task", num_args = 1.., value_name = "FILE")]
    data: Vec<PathBuf>,

    /// A multiple-choice task (JSONL: context, choices, gold[, target_delimiter]; README
    /// "Multiple-choice tasks"), scored as lm-evaluation-harness scores multiple_choice
    /// tasks: acc, acc_norm, the gold choice's mean log-likelihood and its cross-entropy
    /// among the choices; repeatable.
    #[arg(long, value_name = "FILE")]
    task: Vec<PathBuf>,

    /// Another data set scored separately (for example another domain); repeatable.
    #[arg(long, value_name = "FILE")]
    extra_data: Vec<PathBuf>,

    #[command(flatten)]
    window: ckmerge_common::WindowSpec,

    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,

    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,

    /// Evaluate on GPUs: `all`, a list of CUDA ordinals (`0,1`), `auto` (GPUs if any),
    /// or `none` (the CPU reference, the default).
    #[arg(long, default_value = "none")]
    gpus: String,
}

#[derive(Args)]
struct VerifyArgs {
    /// A model directory written by `ckmerge merge` (or a search's `merged/`).
    dir: PathBuf,

    /// Recompute from these checkpoints (in the merge's order) instead of the paths
    /// ckmerge.json records, for sources that have moved.
    #[arg(long, num_args = 1.., value_name = "CKPT")]
    sources: Vec<PathBuf>,

    /// Check the shard hashes only (no sources needed; fast).
    #[arg(long)]
    hashes_only: bool,

    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct MergeArgs {
    /// Hugging Face model directories of one training run, earliest first, or
    /// `org/name@revision` in the local Hugging Face cache (never downloaded).
    #[arg(required = true, value_name = "CKPT")]
    checkpoints: Vec<PathBuf>,

    #[command(flatten)]
    w: WeightArgs,

    /// Output directory (must not exist, unless --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Output dtype (f32, bf16, f16); default: each tensor keeps its source dtype.
    #[arg(long)]
    dtype: Option<DType>,

    /// Largest output shard, as in `save_pretrained` (5GB = 5*10^9 bytes, 5GiB = 5*2^30).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,

    /// Replace an existing output directory (only one that holds a model).
    #[arg(long)]
    force: bool,

    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,

    /// Write only part I of N of the output shards (0-based, for example
    /// `$SLURM_PROCID/$SLURM_NTASKS`), into a directory beside --out shared by the parts;
    /// `--finish-parts N` then assembles the model. Same bytes as a single-process merge.
    #[arg(long, value_name = "I/N", value_parser = parse_part, conflicts_with = "finish_parts")]
    part: Option<(usize, usize)>,

    /// Check that all N parts are written, add the index, config and provenance, and move
    /// the model into place.
    #[arg(long, value_name = "N")]
    finish_parts: Option<usize>,

    /// Print one JSON object when the merge ends instead of the text line (fields in
    /// README.md, "Machine-readable output").
    #[arg(long)]
    json: bool,
}

fn parse_part(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: write I/N, for example 0/4"))?;
    let i: usize = i
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: I is not a number"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: N is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!(
            "`{s}`: need 0 <= I < N (parts are numbered from 0)"
        ));
    }
    Ok((i, n))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tarpc=warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    on_bus_error_explain_and_exit();
    // An interrupted run removes its partial output before exiting.
    let _ = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        ckmerge_common::write::remove_live_staged_dirs();
        match INTERRUPT_NOTE.get() {
            Some(note) => eprintln!("interrupted: {note}"),
            None => eprintln!("interrupted: no output was written"),
        }
        std::process::exit(130);
    });
    let result = match cli.command {
        Command::Merge(args) => run_merge(args),
        Command::Eval(args) => run_eval(args),
        Command::Search(args) => run_search(args),
        Command::Worker(args) => run_worker(args),
        Command::GpuBench(args) => run_gpu_bench(args),
        Command::Verify(args) => run_verify(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ckmerge",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => write_man_pages(&out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // An interrupt's cleanup makes the work fail (its output directory vanishes): the
        // handler reports and exits with 130; this thread must not race it with status 1.
        Err(_) if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Inputs are memory-mapped: a file that shrinks while it is read (another process
/// truncating or rewriting a checkpoint) raises SIGBUS at the next read of a page past
/// its new end, which would kill the process with a bare "Bus error". The handler says
/// what happened instead and exits with status 1. It only writes a constant message and
/// exits (both async-signal-safe); a merge's hidden staging directory is left to the next
/// merge into the same place, which removes a dead process's partial output.
fn on_bus_error_explain_and_exit() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"error: an input file changed size while ckmerge was reading it (SIGBUS on a memory-mapped file): checkpoints and data must not be modified while ckmerge runs; nothing was completed, run the command again once the inputs are settled\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: installs a handler that calls only async-signal-safe functions; the
    // sigaction struct is zero-initialised (empty mask, no flags) before use.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Set by the interrupt handler when it starts.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What an interrupt leaves behind, when it is not "nothing".
static INTERRUPT_NOTE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn run_search(args: SearchCliArgs) -> Result<()> {
    set_threads(args.threads)?;
    let run_dir = args
        .resume
        .clone()
        .or(args.run_dir.clone())
        .expect("clap requires --run-dir or --resume");
    let _ = INTERRUPT_NOTE.set(format!(
        "the journal in {0} keeps every completed trial; continue with `ckmerge search --resume {0}`",
        run_dir.display()
    ));
    let outcome = ckmerge_coordinator::search::run(ckmerge_coordinator::search::SearchArgs {
        config: args.config,
        run_dir,
        resume: args.resume.is_some(),
        force: args.force,
        secret_file: args.secret_file,
        live: true,
        max_evals: args.max_evals,
        local_workers: args.local_workers,
        workers_file: args.workers_file,
        stages: args.stages,
        local_gpus: args.gpus,
    })?;
    if args.json {
        let summary = ckmerge_coordinator::summary::SearchSummaryJson::new(&outcome);
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let r = &outcome.report;
    println!(
        "{} evaluations ({} failed); stopped: {}",
        r.evaluations, r.failed, r.stop_reason
    );
    for rf in &r.references {
        let scores: Vec<String> = rf
            .scores
            .iter()
            .map(|s| match &s.task {
                None => format!("{} ppl {:.4}", s.name, s.perplexity),
                Some(t) => format!(
                    "{} acc {:.4} acc_norm {:.4} choice NLL {:.4}",
                    s.name, t.acc, t.acc_norm, s.mean_nll
                ),
            })
            .collect();
        let w: Vec<String> = rf.weights.iter().map(|x| format!("{x:.4}")).collect();
        println!(
            "{:>16}  [{}]  {}",
            rf.label,
            w.join(", "),
            scores.join(", ")
        );
    }
    // A task's score at a reference, by label.
    let task = |label: &str, d: usize| {
        r.references
            .iter()
            .find(|x| x.label == label)
            .and_then(|x| x.scores.get(d))
            .and_then(|s| s.task.map(|t| (t.acc, s.mean_nll)))
    };
    for (d, i) in r.improvement.iter().enumerate() {
        let src = task(&i.best_source, d);
        match (task("best found", d), src, task("uniform average", d)) {
            (Some((b, bn)), Some((s, sn)), Some((u, un))) => println!(
                "{}: best merge acc {b:.4}, {:+.1} points vs the source of lowest choice NLL ({}), {:+.1} vs the uniform average; choice NLL {:+.4} and {:+.4} nats",
                i.dataset,
                (b - s) * 100.0,
                i.best_source,
                (b - u) * 100.0,
                bn - sn,
                bn - un
            ),
            _ => println!(
                "{}: best merge {:+.2}% perplexity vs the best source ({}), {:+.2}% vs the uniform average",
                i.dataset, i.change_vs_best_source_pct, i.best_source, i.change_vs_uniform_pct
            ),
        }
    }
    if let Some(m) = &r.merged_model {
        println!("merged model: {}", m.display());
    }
    println!("report: {}", outcome.run_dir.join("report.md").display());
    Ok(())
}

fn run_gpu_bench(args: GpuBenchArgs) -> Result<()> {
    use ckmerge_kernels::cuda::{bench::merge_bandwidth, device::Gpu};
    if let Some(a) = &args.attention {
        if a.len() != 5 || a.contains(&0) || a[2] % a[3] != 0 || ![64, 128].contains(&a[4]) {
            bail!("--attention {a:?}: give WINDOWS,SEQ,HEADS,KV_HEADS,HD, HEADS a multiple of KV_HEADS, HD 64 or 128");
        }
    }
    let gpu = Gpu::open(args.gpu)?;
    if let Some(a) = args.attention {
        let rows = ckmerge_kernels::cuda::bench::attention_variants(
            &gpu,
            a[0],
            a[1],
            (a[2], a[3], a[4]),
            args.iters,
        )?;
        for r in rows {
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    for n in args.sources {
        let r = merge_bandwidth(&gpu, args.bytes, n, args.dtype, args.iters)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `--gpus` (see `ckmerge_worker::gpu::resolve_gpus`).
fn resolve_gpus(arg: &str) -> Result<Option<Vec<usize>>> {
    ckmerge_worker::gpu::resolve_gpus(arg).map_err(|e| anyhow::anyhow!(e))
}

fn run_worker(args: WorkerArgs) -> Result<()> {
    set_threads(args.threads)?;
    let gpus = resolve_gpus(&args.gpus)?;
    let secret = ckmerge_common::protocol::Secret::load(args.secret_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    ckmerge_worker::listen::run(ckmerge_worker::listen::ListenOptions {
        listen: args.listen,
        advertise: args.advertise,
        announce: args.announce,
        secret,
        gpus,
        gpus_auto: args.gpus.trim() == "auto",
        fixed_cost: args
            .bench_fixed_cost_ms
            .map(std::time::Duration::from_millis),
    })
}

fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(())
}

/// Checkpoint arguments as directories: a path as given, or `org/name[@revision]` found
/// in the local Hugging Face cache (see `ckmerge_common::hub`).
fn checkpoint_dirs(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    args.iter()
        .map(|a| ckmerge_common::hub::resolve(a).map_err(anyhow::Error::from))
        .collect()
}

fn run_eval(mut args: EvalArgs) -> Result<()> {
    args.checkpoints = checkpoint_dirs(&args.checkpoints)?;
    let weights = args
        .w
        .resolve(args.checkpoints.len())
        .map_err(anyhow::Error::msg)?;
    set_threads(args.threads)?;
    let opts = EvalOptions {
        window: args.window,
        groups: None,
        stage: None,
        gpus: ckmerge_worker::gpu::resolve_gpus_for(
            &args.gpus,
            (!args.task.is_empty())
                .then_some("the GPU path of multiple-choice tasks has not been run on a GPU yet (pass --gpus to use it)")
                .or_else(|| {
                    let first = args.checkpoints.first()?;
                    ckmerge_worker::gpu::unverified_on_gpu(&ckmerge_worker::gpu::model_type(first)?)
                }),
        )
        .map_err(anyhow::Error::msg)?,
    };
    let mut sets = Vec::new();
    if !args.data.is_empty() {
        sets.push(DatasetSpec::new(
            dataset_name(&args.data),
            args.data.clone(),
        ));
    }
    sets.extend(
        args.extra_data
            .iter()
            .map(|f| DatasetSpec::new(dataset_name(std::slice::from_ref(f)), vec![f.clone()])),
    );
    let n_text = sets.len();
    sets.extend(
        args.task
            .iter()
            .map(|f| DatasetSpec::task(dataset_name(std::slice::from_ref(f)), f.clone())),
    );
    let mut ev = Evaluator::load(&args.checkpoints, &sets, &opts)?;
    let t_merge = std::time::Instant::now();
    ev.set_weights(&weights)?;
    let merge_seconds = t_merge.elapsed().as_secs_f64();
    let results = (0..n_text)
        .map(|d| ev.score(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut task_scores = Vec::new();
    for d in n_text..sets.len() {
        let t0 = std::time::Instant::now();
        let s = ev.score_task(d)?;
        task_scores.push((s, t0.elapsed().as_secs_f64()));
    }
    let tasks: Vec<&ckmerge_worker::choice::Task> = ev.datasets[n_text..]
        .iter()
        .map(|d| d.task.as_ref().expect("loaded as a task"))
        .collect();
    if let Some(rows) = ckmerge_kernels::cuda::profile::report() {
        // CKMERGE_GPU_PROFILE: the per-operation split, on stderr so --json stays clean.
        for (op, seconds, calls) in rows {
            eprintln!("profile: {seconds:9.4} s {calls:7} calls  {op}");
        }
    }
    if args.json {
        let v = serde_json::json!({
            "checkpoints": args.checkpoints,
            "weights": weights,
            "seq_len": ev.seq_len,
            "stride": args.window.stride,
            "load_seconds": ev.load_seconds,
            "device": ev.device(),
            "merge_seconds": merge_seconds,
            "datasets": ev.datasets[..n_text].iter().zip(&sets).zip(&results).map(|((d, DatasetSpec { files, .. }), r)| serde_json::json!({
                "name": d.name, "files": files, "windows": d.windows.len(),
                "tokens_scored": r.tokens, "mean_nll": r.mean_nll, "perplexity": r.perplexity,
                "seconds": r.seconds, "tokens_per_s": r.tokens_per_s,
            })).collect::<Vec<_>>(),
            "tasks": tasks.iter().zip(&task_scores).map(|(t, (s, seconds))| serde_json::json!({
                "name": s.name, "file": t.path, "items": s.items, "acc": s.acc,
                "acc_norm": s.acc_norm, "gold_ll": s.gold_ll, "choice_nll": s.choice_nll,
                "seconds": seconds,
                "tokens": t.requests.iter().map(|r| r.input.len()).sum::<usize>(),
                "per_item": s.per_item,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (s, seconds) in &task_scores {
            println!(
                "{}: {} items, acc {:.4}, acc_norm {:.4}, gold log-likelihood {:.4}, gold cross-entropy among the choices {:.4} ({:.2} s)",
                s.name, s.items, s.acc, s.acc_norm, s.gold_ll, s.choice_nll, seconds
            );
        }
        for (d, r) in ev.datasets[..n_text].iter().zip(&results) {
            println!(
                "{}: {} tokens scored in {} windows of {}, mean NLL {:.6}, perplexity {:.4} ({:.2} s, {:.0} tokens/s)",
                d.name,
                r.tokens,
                d.windows.len(),
                ev.seq_len,
                r.mean_nll,
                r.perplexity,
                r.seconds,
                r.tokens_per_s
            );
        }
    }
    // Printed above for the record, but not a result: a script must not take it for one.
    if let Some((d, r)) = ev.datasets[..n_text]
        .iter()
        .zip(&results)
        .find(|(_, r)| !(r.mean_nll.is_finite() && r.perplexity.is_finite()))
    {
        bail!(
            "{}: the perplexity is {} (mean NLL {}): the merged model's outputs are not finite (a weight or a source holds NaN or inf, or the dtype overflowed)",
            d.name,
            r.perplexity,
            r.mean_nll
        );
    }
    Ok(())
}

fn run_verify(mut args: VerifyArgs) -> Result<()> {
    args.sources = checkpoint_dirs(&args.sources)?;
    set_threads(args.threads)?;
    let sources = (!args.sources.is_empty()).then_some(args.sources.as_slice());
    let r = ckmerge_worker::verify::verify(&args.dir, sources, !args.hashes_only)?;
    println!(
        "{}: {} shard{} hash-checked, {} tensor{} recomputed{}",
        args.dir.display(),
        r.shards_hashed,
        if r.shards_hashed == 1 { "" } else { "s" },
        r.tensors_checked,
        if r.tensors_checked == 1 { "" } else { "s" },
        if r.sources.is_empty() {
            String::new()
        } else {
            format!(" from {} sources", r.sources.len())
        }
    );
    for p in r.bad_shards.iter().chain(&r.bad_tensors) {
        println!("  DIFFERS  {p}");
    }
    if !r.ok() {
        bail!(
            "{} does not verify: {} shard and {} tensor problems (listed above)",
            args.dir.display(),
            r.bad_shards.len(),
            r.bad_tensors.len()
        );
    }
    println!("verified: identical to what ckmerge wrote and to the merge of its sources");
    Ok(())
}

fn run_merge(mut args: MergeArgs) -> Result<()> {
    args.checkpoints = checkpoint_dirs(&args.checkpoints)?;
    if !args.w.given() {
        bail!("give --weights (one per checkpoint), --lambda for two checkpoints, or an average along the run (--ema A, --wma, --window K, --minus-sqrt)");
    }
    let weights = args
        .w
        .resolve(args.checkpoints.len())
        .map_err(anyhow::Error::msg)?;
    set_threads(args.threads)?;
    let argv: Vec<String> = std::env::args().collect();
    let req = MergeRequest {
        sources: args.checkpoints.clone(),
        weights: ckmerge_common::MergeWeights::single(weights.clone()),
        out: args.out.clone(),
        dtype: args.dtype,
        max_shard_bytes: args.max_shard_size,
        force: args.force,
        provenance: serde_json::json!({ "argv": argv }),
        groups: None,
        part: match (args.part, args.finish_parts) {
            (Some((index, count)), _) => Some(MergePart::Shards { index, count }),
            (None, Some(count)) => Some(MergePart::Finish { count }),
            (None, None) => None,
        },
    };
    for (c, w) in args.checkpoints.iter().zip(&weights) {
        tracing::info!("{w:>10} x {}", c.display());
    }
    let bar = Bar(indicatif::ProgressBar::hidden());
    let summary = merge_to_dir(&req, &bar)?;
    if args.json {
        let j = ckmerge_coordinator::summary::MergeSummaryJson {
            schema_version: ckmerge_coordinator::summary::SCHEMA_VERSION,
            out: summary.out.clone(),
            complete: args.part.is_none(),
            part: args
                .part
                .map(|(index, count)| ckmerge_coordinator::summary::PartJson { index, count }),
            checkpoints: args.checkpoints.clone(),
            weights,
            tensors: summary.tensors,
            shards: summary.shards,
            bytes_read: summary.bytes_read,
            bytes_written: summary.bytes_written,
            seconds: summary.seconds,
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    if let Some((i, n)) = args.part {
        println!(
            "part {i}/{n}: wrote {} shard{} ({}) into {} in {:.2} s; when all {n} parts are done, run the same command with --finish-parts {n} instead of --part",
            summary.shards,
            if summary.shards == 1 { "" } else { "s" },
            human_bytes(summary.bytes_written),
            summary.out.display(),
            summary.seconds
        );
        return Ok(());
    }
    println!(
        "wrote {} ({} tensors, {} shard{}, {}) in {:.2} s ({}/s read + written)",
        summary.out.display(),
        summary.tensors,
        summary.shards,
        if summary.shards == 1 { "" } else { "s" },
        human_bytes(summary.bytes_written),
        summary.seconds,
        human_bytes(
            ((summary.bytes_read + summary.bytes_written) as f64 / summary.seconds.max(1e-9))
                as u64
        ),
    );
    Ok(())
}

/// The man pages from the CLI definition (clap_mangen): one per command, as `git` has.
/// Hidden commands (benchmarks) get none.
fn write_man_pages(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("writing the man pages into {}", out.display()))?;
    println!("wrote the man pages into {}", out.display());
    Ok(())
}

/// A byte progress bar on stderr, drawn only when stderr is a terminal.
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.0.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
