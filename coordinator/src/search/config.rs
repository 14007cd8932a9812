//! The search configuration (`run.toml`): what to merge, what to score it on, how to
//! search, and where the workers are. Paths in the file are relative to the file; the
//! copy stored in the run directory has them resolved to absolute paths, so a resumed
//! run reads the same files wherever it is started from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ckmerge_common::protocol::{DatasetScore, DatasetSpec, LoadSpec, SetKind};
use ckmerge_common::size::parse_size;
use ckmerge_common::{check_compatible, Checkpoint, DType, Grouping, WindowSpec};
use ckmerge_worker::eval::{load_datasets, window_length};
use ckmerge_worker::model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::bo::optimizer::Strategy;
use crate::bo::space::Family;
use crate::bo::{Acquisition, BoConfig, SearchSpace};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// Checkpoint directories of one training run, earliest first.
    pub checkpoints: Vec<PathBuf>,
    #[serde(default)]
    pub space: SpaceConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub search: SearchParams,
    #[serde(default)]
    pub workers: WorkersConfig,
    #[serde(default)]
    pub output: OutputConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SpaceConfig {
    /// The paper's space: two checkpoints `[prev, cur]`, `lambda * cur + (1 - lambda) * prev`.
    Lambda {
        #[serde(default)]
        alpha: f64,
    },
    /// Weights on the simplex, one per checkpoint, each at least its lower bound.
    Simplex {
        #[serde(default)]
        lower: Option<Vec<f64>>,
    },
    /// One simplex weight vector per tensor group (see `ckmerge_worker::groups`).
    Groups { groups: Grouping },
    /// The exponential moving average of the checkpoints (oldest first), its decay
    /// searched (see `crate::bo::space::Family`).
    Ema {},
    /// The linearly weighted average of the latest k checkpoints, k searched.
    Wma {},
    /// The uniform average of the latest k checkpoints, k searched.
    Window {},
    /// Megatron-LM's minus-sqrt coefficients over the latest k checkpoints, k searched.
    MinusSqrt {},
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig::Lambda { alpha: 0.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// What the search minimises: held-out files (their mean NLL per token), or a
    /// weighted mixture of named sets of `extra` and `tasks` (see [`Objective`]).
    pub objective: ObjectiveConfig,
    /// Other domains, by name: scored for the report, and searched on only where the
    /// objective names them.
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<PathBuf>>,
    /// Multiple-choice tasks (one JSONL file each), by name: scored as
    /// lm-evaluation-harness scores `multiple_choice` tasks, for the report, and searched
    /// on (their `choice_nll`) only where the objective names them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, PathBuf>,
    /// `seq_len`, `stride`, `batch`, `max_tokens`, `token_bits`, as keys of `[data]`.
    #[serde(flatten)]
    pub window: WindowSpec,
}

/// `data.objective`: a list of held-out files, or a table of set names to weights.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ObjectiveConfig {
    /// Files or directories of held-out text or tokens, scored as one set named after
    /// the first file.
    Files(Vec<PathBuf>),
    /// Sets of `data.extra` and `data.tasks` by name, with their weights.
    Mixture(BTreeMap<String, f64>),
}

impl<'de> Deserialize<'de> for ObjectiveConfig {
    // By hand rather than `untagged`, whose error says only that no variant matched.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ObjectiveConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of held-out files (`[\"heldout.txt\"]`), or a table of set names of data.extra and data.tasks to weights (`{ prose = 0.7, cloze = 0.3 }`)")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                Vec::<PathBuf>::deserialize(serde::de::value::SeqAccessDeserializer::new(a))
                    .map(ObjectiveConfig::Files)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                BTreeMap::<String, f64>::deserialize(serde::de::value::MapAccessDeserializer::new(
                    a,
                ))
                .map(ObjectiveConfig::Mixture)
            }
        }
        d.deserialize_any(V)
    }
}

/// What a trial's value is: the weighted mean of the values of the objective's sets (the
/// first sets of [`SearchConfig::datasets`], in that order), each set's `mean_nll`: nats
/// per scored token for text, nats per item for a task (the gold choice's cross-entropy
/// among its choices). Both are cross-entropies in nats, so a weight says how much a nat
/// of one set counts against a nat of another; the weights are normalised to sum to 1,
/// so a single set's value is its own mean NLL.
#[derive(Clone, Debug, PartialEq)]
pub struct Objective {
    pub sets: Vec<(String, f64)>,
}

impl Objective {
    /// Each set's weight, in the objective's order (what a race is sent).
    pub fn weights(&self) -> Vec<f64> {
        self.sets.iter().map(|(_, w)| *w).collect()
    }

    /// The objective's value from a reply's scores (the objective's sets first), or why
    /// there is none: too few scores, or one that is not finite.
    pub fn value(&self, scores: &[DatasetScore]) -> Result<f64, String> {
        if scores.len() < self.sets.len() {
            return Err(format!(
                "the worker returned {} scores for an objective of {} sets",
                scores.len(),
                self.sets.len()
            ));
        }
        let mut v = 0.0;
        for ((name, w), s) in self.sets.iter().zip(scores) {
            if s.name != *name {
                return Err(format!(
                    "the worker scored `{}` where the objective's `{name}` was expected",
                    s.name
                ));
            }
            if !(s.mean_nll.is_finite() && s.perplexity.is_finite()) {
                return Err(format!(
                    "the objective is not finite on `{name}` (mean NLL {}, perplexity {}): the merge diverged, or a source holds NaN or inf",
                    s.mean_nll, s.perplexity
                ));
            }
            v += w * s.mean_nll;
        }
        Ok(v)
    }

    /// A single set of weight 1 (the files form, or a mixture of one set).
    pub fn is_single(&self) -> bool {
        self.sets.len() == 1
    }
}

/// The longest duration a config may give, in seconds (about 11.6 days).
pub const MAX_SECONDS: f64 = 1e6;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchParams {
    /// Completed evaluations after which the search stops.
    pub max_evals: usize,
    /// Wall-time budget of one coordinator session, in seconds.
    pub max_seconds: Option<f64>,
    pub seed: u64,
    /// `ei` (the default), `hedge` (the paper's GP-Hedge over EI, PI and LCB), `pi` or
    /// `lcb`.
    pub acquisition: String,
    /// Stop when the best expected improvement stays under this for 3 rounds.
    pub converge_tol: Option<f64>,
    /// Stop the run (an error) after this many trials in a row failed for good: a search
    /// whose objective is NaN over most of the space would otherwise propose forever.
    pub max_failures_in_row: usize,
    /// With three or more checkpoints, score the averages practitioners take (each
    /// checkpoint, the uniform average, EMA, WMA, last-k windows, minus-sqrt; see
    /// `report::trajectory_averages`) before the search: the report compares the best
    /// found with each, and those that are points of the search space are given to the
    /// optimiser as observations. They cost that many evaluations (on every data set) and
    /// do not count towards `max_evals`.
    pub baselines: bool,
    /// Stop a trial once it is clearly worse than the best full evaluation so far, or
    /// clearly better (it then leads, and is scored whole at the end if still leading) (a
    /// sequential test on its per-batch NLLs, windows in a fixed random order; see
    /// `ckmerge_common::race`; a task's items, a mixture's sets sampled together). Off
    /// by default; through a pipeline, its head races each window through the stages.
    pub early_stop: bool,
    /// The chance that early stopping stops a trial that is not worse than the incumbent
    /// on the whole set (at most, under the test's normal approximation).
    pub early_stop_alpha: f64,
    /// Also stop a trial that cannot improve the incumbent by more than this, in the
    /// objective's units (nats per token for text: 0.001 is 0.1 % of perplexity); the
    /// best found is then within it of what scoring every trial whole gives the same
    /// trials. 0: stop only trials that are worse.
    pub early_stop_margin: f64,
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams {
            max_evals: 12,
            max_seconds: None,
            seed: 0,
            acquisition: "ei".into(),
            converge_tol: None,
            max_failures_in_row: 10,
            baselines: true,
            early_stop: false,
            early_stop_alpha: 0.01,
            early_stop_margin: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// `host:port` of `ckmerge worker` processes. None: in-process workers.
    pub addresses: Vec<String>,
    /// A file of worker addresses, one per line, re-read while the search runs so workers
    /// can join late (a launcher appends to it as they start).
    pub addresses_file: Option<PathBuf>,
    /// Pipelines for models too big for one worker: each entry lists the workers holding
    /// consecutive layer ranges, first to last; the coordinator talks to the first and
    /// treats the whole group as one evaluator. Hidden states go worker to worker.
    pub pipelines: Vec<Vec<String>>,
    /// Group the workers of `addresses` and `addresses_file`, in the order they are listed
    /// (announced), into pipelines of this many stages (1: every worker holds the whole
    /// model). For a model too big for one node under a launcher such as Slurm.
    pub stages: usize,
    /// In-process workers when no addresses are given (default: 1, see `local_default`).
    pub local: Option<usize>,
    /// The run's shared secret, as a file (else the `CKMERGE_SECRET` variable).
    pub secret_file: Option<PathBuf>,
    /// Longest one evaluation may take before its worker is treated as lost.
    pub deadline_s: f64,
    /// Longest loading sources and data may take.
    pub load_deadline_s: f64,
    pub heartbeat_s: f64,
    /// A worker that has not answered a heartbeat for this long is lost.
    pub heartbeat_timeout_s: f64,
    /// Attempts (on different workers where possible) before a trial is recorded failed.
    pub max_attempts: usize,
    /// Give up when no worker has been usable for this long.
    pub wait_s: f64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            addresses: Vec::new(),
            addresses_file: None,
            pipelines: Vec::new(),
            stages: 1,
            local: None,
            secret_file: None,
            deadline_s: 3600.0,
            load_deadline_s: 3600.0,
            heartbeat_s: 5.0,
            heartbeat_timeout_s: 30.0,
            max_attempts: 2,
            wait_s: 600.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Write the merged model of the best weights to `RUN_DIR/merged`.
    pub merge: bool,
    /// Output dtype (`f32`, `bf16`, `f16`); default: as in the sources.
    pub dtype: Option<String>,
    pub max_shard_size: String,
    /// Draw PNG plots.
    pub plots: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            merge: true,
            dtype: None,
            max_shard_size: "5GB".into(),
            plots: true,
        }
    }
}

/// What validation learned about the model, for the log and the report.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub model_type: String,
    pub parameters: u64,
    pub tensors: usize,
    pub layers: usize,
}

impl SearchConfig {
    /// Reads `path` and resolves its relative paths against the file's directory.
    pub fn load(path: &Path) -> Result<SearchConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the search config {}", path.display()))?;
        let mut cfg: SearchConfig =
            toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let base =
            std::path::absolute(&base).with_context(|| format!("resolving {}", base.display()))?;
        cfg.resolve(&base)?;
        Ok(cfg)
    }

    /// Makes every relative path absolute against `base`; a checkpoint given as
    /// `org/name[@revision]` that is no path under `base` becomes its snapshot in the
    /// local Hugging Face cache (pinned to the commit, so a resume reads the same weights
    /// even after the branch moves).
    fn resolve(&mut self, base: &Path) -> Result<()> {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        for (i, c) in self.checkpoints.iter_mut().enumerate() {
            if c.is_relative() && !base.join(&*c).exists() {
                *c =
                    ckmerge_common::hub::resolve(c).with_context(|| format!("checkpoints[{i}]"))?;
            }
            abs(c);
        }
        if let ObjectiveConfig::Files(files) = &mut self.data.objective {
            files.iter_mut().for_each(abs);
        }
        for files in self.data.extra.values_mut() {
            files.iter_mut().for_each(abs);
        }
        self.data.tasks.values_mut().for_each(abs);
        if let Some(f) = self.workers.addresses_file.as_mut() {
            abs(f);
        }
        if let Some(f) = self.workers.secret_file.as_mut() {
            abs(f);
        }
        Ok(())
    }

    /// The config as stored in the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    /// The parts that define what a trial's value means. A run may be resumed with other
    /// workers, a larger budget or other output options, never with different ones of these.
    pub fn objective_key(&self) -> serde_json::Value {
        let mut k = serde_json::json!({
            "checkpoints": self.checkpoints,
            "space": self.space,
            "data": self.data,
            "seed": self.search.seed,
            "acquisition": self.search.acquisition,
        });
        // Early stopping changes the windows' order and what a trial's value is; absent
        // when off, so the key of a run made before it existed is unchanged.
        // The margin likewise only when set.
        if self.search.early_stop {
            k["early_stop"] = serde_json::json!({ "alpha": self.search.early_stop_alpha });
            if self.search.early_stop_margin != 0.0 {
                k["early_stop"]["margin"] = self.search.early_stop_margin.into();
            }
        }
        k
    }

    /// The seed of the objective's window order under early stopping.
    pub fn window_seed(&self) -> Option<u64> {
        self.search
            .early_stop
            .then_some(self.search.seed ^ 0x5EED_0F0A_DE50)
    }

    /// Why `other` (a resume's config) cannot continue this run, if it cannot.
    pub fn resume_conflicts(&self, other: &SearchConfig) -> Vec<String> {
        let (a, b) = (self.objective_key(), other.objective_key());
        let mut out = Vec::new();
        for k in [
            "checkpoints",
            "space",
            "data",
            "seed",
            "acquisition",
            "early_stop",
        ] {
            if a[k] != b[k] {
                out.push(format!("{k}: run has {}, new config has {}", a[k], b[k]));
            }
        }
        out
    }

    pub fn search_space(&self) -> Result<SearchSpace> {
        let n = self.checkpoints.len();
        let s = match &self.space {
            SpaceConfig::Lambda { alpha } => {
                if n != 2 {
                    bail!("space.kind = \"lambda\" merges exactly two checkpoints (earlier first); the config lists {n}: use kind = \"simplex\" for more");
                }
                SearchSpace::lambda(*alpha)
            }
            SpaceConfig::Simplex { lower } => {
                SearchSpace::simplex(lower.clone().unwrap_or_else(|| vec![0.0; n])).and_then(|s| {
                    if s.n_weights() != n {
                        Err(format!(
                            "space.lower has {} bounds for {n} checkpoints",
                            s.n_weights()
                        ))
                    } else {
                        Ok(s)
                    }
                })
            }
            SpaceConfig::Groups { groups } => {
                if n < 2 {
                    bail!("a group search needs at least two checkpoints");
                }
                Ok(SearchSpace::Grouped {
                    groups: groups.len(),
                    n,
                })
            }
            SpaceConfig::Ema {} => SearchSpace::family(Family::Ema, n),
            SpaceConfig::Wma {} => SearchSpace::family(Family::Wma, n),
            SpaceConfig::Window {} => SearchSpace::family(Family::Window, n),
            SpaceConfig::MinusSqrt {} => SearchSpace::family(Family::MinusSqrt, n),
        };
        s.map_err(|e| anyhow::anyhow!("space: {e}"))
    }

    /// Refuses every number no run could use, naming the field: durations must be
    /// positive, finite and at most [`MAX_SECONDS`] (a duration beyond that is a typo, and
    /// would overflow the timers), counts at least 1, the window usable.
    pub fn check_numbers(&self) -> Result<()> {
        let w = &self.workers;
        for (field, v) in [
            ("workers.deadline_s", w.deadline_s),
            ("workers.load_deadline_s", w.load_deadline_s),
            ("workers.heartbeat_s", w.heartbeat_s),
            ("workers.heartbeat_timeout_s", w.heartbeat_timeout_s),
            ("workers.wait_s", w.wait_s),
        ]
        .into_iter()
        .chain(self.search.max_seconds.map(|v| ("search.max_seconds", v)))
        {
            if !(v.is_finite() && v > 0.0 && v <= MAX_SECONDS) {
                bail!(
                    "{field} = {v}: give a number of seconds above 0 and at most {MAX_SECONDS:e}"
                );
            }
        }
        if w.heartbeat_timeout_s <= w.heartbeat_s {
            bail!(
                "workers.heartbeat_timeout_s = {} is not above workers.heartbeat_s = {}: every worker would be declared lost between two heartbeats",
                w.heartbeat_timeout_s,
                w.heartbeat_s
            );
        }
        if let Some(t) = self.search.converge_tol {
            if !(t.is_finite() && t > 0.0) {
                bail!("search.converge_tol = {t}: give a positive number (an expected improvement in standardised units), or leave it out");
            }
        }
        if self.search.max_failures_in_row == 0 {
            bail!("search.max_failures_in_row = 0: use at least 1");
        }
        if w.max_attempts == 0 {
            bail!("workers.max_attempts = 0: a trial needs at least 1 attempt");
        }
        if w.local == Some(0)
            && w.addresses.is_empty()
            && w.pipelines.is_empty()
            && w.addresses_file.is_none()
        {
            bail!("workers.local = 0 with no remote workers leaves nothing to evaluate on: use at least 1, or list worker addresses");
        }
        self.data
            .window
            .check()
            .map_err(|e| anyhow::anyhow!("data.{e}"))
    }

    pub fn bo_config(&self) -> Result<BoConfig> {
        let strategy = match self.search.acquisition.as_str() {
            "ei" => Strategy::Single(Acquisition::Ei),
            "pi" => Strategy::Single(Acquisition::Pi),
            "lcb" | "ucb" => Strategy::Single(Acquisition::Lcb),
            "hedge" | "gp_hedge" => Strategy::Hedge,
            a => bail!("search.acquisition = \"{a}\": use ei, pi, lcb or hedge"),
        };
        if self.search.max_evals == 0 {
            bail!("search.max_evals must be at least 1");
        }
        Ok(BoConfig {
            seed: self.search.seed,
            max_evals: self.search.max_evals,
            max_seconds: self.search.max_seconds,
            converge_tol: self.search.converge_tol,
            strategy,
            ..BoConfig::default()
        })
    }

    pub fn dtype(&self) -> Result<Option<DType>> {
        self.output
            .dtype
            .as_deref()
            .map(|d| {
                d.parse::<DType>()
                    .map_err(|e| anyhow::anyhow!("output.dtype: {e}"))
            })
            .transpose()
    }

    pub fn max_shard_bytes(&self) -> Result<u64> {
        parse_size(&self.output.max_shard_size)
            .map_err(|e| anyhow::anyhow!("output.max_shard_size: {e}"))
    }

    /// The objective's sets and their normalised weights (see [`Objective`]).
    pub fn objective(&self) -> Objective {
        match &self.data.objective {
            ObjectiveConfig::Files(files) => Objective {
                sets: vec![(ckmerge_worker::eval::dataset_name(files), 1.0)],
            },
            ObjectiveConfig::Mixture(m) => {
                let total: f64 = m.values().sum();
                Objective {
                    sets: m.iter().map(|(k, w)| (k.clone(), w / total)).collect(),
                }
            }
        }
    }

    /// Data sets in the order workers score them: the objective's first (in the order
    /// of [`SearchConfig::objective`]), then the other extra sets, then the other tasks.
    pub fn datasets(&self) -> Vec<DatasetSpec> {
        let named = |k: &String| -> Option<DatasetSpec> {
            match (self.data.extra.get(k), self.data.tasks.get(k)) {
                (Some(f), _) => Some(DatasetSpec::new(k.clone(), f.clone())),
                (None, Some(t)) => Some(DatasetSpec::task(k.clone(), t.clone())),
                (None, None) => None,
            }
        };
        let mut v = match &self.data.objective {
            ObjectiveConfig::Files(files) => vec![DatasetSpec::new(
                ckmerge_worker::eval::dataset_name(files),
                files.clone(),
            )],
            ObjectiveConfig::Mixture(m) => m.keys().filter_map(named).collect(),
        };
        let rest: Vec<&String> = self
            .data
            .extra
            .keys()
            .chain(self.data.tasks.keys())
            .collect();
        for k in rest {
            if !v.iter().any(|d| d.name == *k) {
                v.extend(named(k));
            }
        }
        v
    }

    /// What workers load for the run `run` (see `LoadSpec::run`).
    pub fn load_spec(&self, run: String) -> LoadSpec {
        LoadSpec {
            run,
            checkpoints: self.checkpoints.clone(),
            datasets: self.datasets(),
            objective_sets: self.objective().sets.len(),
            window_seed: self.window_seed(),
            window: self.data.window,
            groups: match &self.space {
                SpaceConfig::Groups { groups } => Some(groups.clone()),
                _ => None,
            },
            pipeline: Vec::new(),
            stage: None,
        }
    }

    /// `data.objective` names sets that exist, with usable weights; no two sets share a
    /// name.
    fn check_objective(&self) -> Result<()> {
        let d = &self.data;
        if !self.search.early_stop && self.search.early_stop_margin != 0.0 {
            bail!("search.early_stop_margin is set but search.early_stop is not: set early_stop = true, or remove the margin");
        }
        if self.search.early_stop {
            let a = self.search.early_stop_alpha;
            if !(a > 0.0 && a < 0.5) {
                bail!("search.early_stop_alpha = {a}: give a probability between 0 and 0.5 (0.01 is the default)");
            }
            let m = self.search.early_stop_margin;
            if !(m.is_finite() && m >= 0.0) {
                bail!("search.early_stop_margin = {m}: give 0 or a positive difference of the objective (nats per token for text; 0.001 is 0.1 % of perplexity)");
            }
        }
        if let Some(k) = d.extra.keys().find(|k| d.tasks.contains_key(*k)) {
            bail!("`{k}` is both in data.extra and in data.tasks; give one of them another name");
        }
        match &d.objective {
            ObjectiveConfig::Files(files) => {
                if files.is_empty() {
                    bail!("data.objective is empty: list the held-out files to search on");
                }
                let name = ckmerge_worker::eval::dataset_name(files);
                if d.extra.contains_key(&name) || d.tasks.contains_key(&name) {
                    bail!("data.extra or data.tasks reuses the objective's name `{name}`; give that set another name");
                }
            }
            ObjectiveConfig::Mixture(m) => {
                if m.is_empty() {
                    bail!("data.objective is an empty table: name one or more sets of data.extra or data.tasks with their weights, or list held-out files");
                }
                for (k, w) in m {
                    if !d.extra.contains_key(k) && !d.tasks.contains_key(k) {
                        let known: Vec<&String> = d.extra.keys().chain(d.tasks.keys()).collect();
                        bail!("data.objective names `{k}`, which is in neither data.extra nor data.tasks (they hold {known:?})");
                    }
                    if !(w.is_finite() && *w > 0.0) {
                        bail!("data.objective.{k} = {w}: a weight must be a positive number");
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks everything a worker would trip over, before any worker is asked to load:
    /// the checkpoints open and are compatible, the model is supported, the data files
    /// exist and are readable, the space fits the checkpoints, the groups cover every
    /// tensor, the output options parse.
    pub fn validate(&self) -> Result<ModelSummary> {
        if self.checkpoints.is_empty() {
            bail!("checkpoints: the config lists none");
        }
        self.check_numbers()?;
        self.check_objective()?;
        for (i, a) in self.checkpoints.iter().enumerate() {
            if let Some(j) = self.checkpoints[..i].iter().position(|b| same_dir(a, b)) {
                bail!(
                    "checkpoints[{j}] and checkpoints[{i}] are the same directory ({}); list each checkpoint once",
                    a.display()
                );
            }
        }
        self.search_space()?;
        self.bo_config()?;
        self.dtype()?;
        self.max_shard_bytes()?;
        let ckpts = self
            .checkpoints
            .iter()
            .map(|p| Checkpoint::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        check_compatible(&ckpts)?;
        let first = &ckpts[0];
        let mc = ModelConfig::from_json(&first.config, &first.dir.join("config.json"))?;
        if let Some(s) = self.data.window.seq_len {
            if s > mc.max_positions {
                bail!(
                    "data.seq_len = {s} exceeds the model's max_position_embeddings ({})",
                    mc.max_positions
                );
            }
        }
        if self.workers.stages == 0 || self.workers.stages > mc.layers {
            bail!(
                "workers.stages = {}: use 1 to {} (the model's layers)",
                self.workers.stages,
                mc.layers
            );
        }
        for (k, p) in self.workers.pipelines.iter().enumerate() {
            if p.len() < 2 || p.len() > mc.layers {
                bail!(
                    "workers.pipelines[{k}] lists {} workers; a pipeline has 2 to {} stages (one per layer at most) — list a single worker under workers.addresses",
                    p.len(),
                    mc.layers
                );
            }
        }
        let seq_len = window_length(&mc, &self.data.window).context("data")?;
        for spec in self.datasets() {
            let DatasetSpec { name, files, kind } = &spec;
            let what = match kind {
                SetKind::Text => "data set",
                SetKind::Task => "task",
            };
            if files.is_empty() {
                bail!("{what} `{name}` lists no files");
            }
            for f in files {
                let ok = if f.is_dir() {
                    std::fs::read_dir(f).map(|_| ())
                } else {
                    std::fs::File::open(f).map(|_| ())
                };
                ok.with_context(|| format!("{what} `{name}`: cannot read {}", f.display()))?;
            }
            // Read, tokenize and window it as every worker will, so that bad content
            // (a malformed line, a foreign token, too few tokens) stops the run here,
            // once, and not at each worker's load. It costs one tokenization of the data
            // on the coordinator.
            load_datasets(
                &first.dir,
                &mc,
                std::slice::from_ref(&spec),
                &self.data.window,
                seq_len,
            )
            .with_context(|| format!("{what} `{name}`"))?;
        }
        if let SpaceConfig::Groups { groups } = &self.space {
            let names: Vec<String> = first.tensors.iter().map(|t| t.name.clone()).collect();
            groups
                .resolve_whole(&names)
                .map_err(|e| anyhow::anyhow!("space.groups: {e}"))?;
        }
        Ok(ModelSummary {
            model_type: first
                .config
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string(),
            parameters: first
                .tensors
                .iter()
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum(),
            tensors: first.tensors.len(),
            layers: mc.layers,
        })
    }
}

/// `a/./b/../c` → `a/c`, without touching the file system (the paths may not exist yet;
/// validation reports that with the path as the user would recognise it).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether `a` and `b` name the same directory (through links or `..`), or the same
/// path where they cannot be resolved.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/run.toml");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(
            &f,
            "checkpoints = [\"../a\", \"/abs/b\"]\n[data]\nobjective = [\"d.txt\"]\n",
        )
        .unwrap();
        let c = SearchConfig::load(&f).unwrap();
        assert_eq!(c.checkpoints[0], dir.path().join("a"));
        assert_eq!(c.checkpoints[1], PathBuf::from("/abs/b"));
        assert_eq!(
            c.data.objective,
            ObjectiveConfig::Files(vec![dir.path().join("sub/d.txt")])
        );
        // The stored copy reads back to the same config.
        let back: SearchConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn an_objective_is_files_or_a_weighted_mixture_of_named_sets() {
        let base = "checkpoints = [\"a\", \"b\"]\n[data]\n";
        let parse = |data: &str| toml::from_str::<SearchConfig>(&format!("{base}{data}"));
        let c = parse(
            "objective = { prose = 3, cloze = 1.0 }\nextra = { prose = [\"p.txt\"], code = [\"c.txt\"] }\ntasks = { cloze = \"cloze.jsonl\", arc = \"arc.jsonl\" }\n",
        )
        .unwrap();
        // Normalised weights, in name order; the objective's sets first, then the other
        // extra sets, then the other tasks.
        assert_eq!(
            c.objective().sets,
            vec![("cloze".to_string(), 0.25), ("prose".to_string(), 0.75)]
        );
        let sets: Vec<(String, SetKind)> =
            c.datasets().into_iter().map(|d| (d.name, d.kind)).collect();
        assert_eq!(
            sets,
            [
                ("cloze", SetKind::Task),
                ("prose", SetKind::Text),
                ("code", SetKind::Text),
                ("arc", SetKind::Task)
            ]
            .map(|(n, k)| (n.to_string(), k))
        );
        assert_eq!(c.load_spec("r".into()).objective_sets, 2);
        let score = |name: &str, v: f64| DatasetScore {
            name: name.into(),
            tokens: 1,
            mean_nll: v,
            perplexity: v.exp(),
            task: None,
        };
        let o = c.objective();
        assert_eq!(
            o.value(&[score("cloze", 1.0), score("prose", 3.0)]),
            Ok(2.5)
        );
        assert!(o
            .value(&[score("cloze", 1.0)])
            .unwrap_err()
            .contains("1 scores for an objective of 2 sets"));
        assert!(o
            .value(&[score("prose", 1.0), score("cloze", 3.0)])
            .unwrap_err()
            .contains("scored `prose` where the objective's `cloze`"));
        assert!(o
            .value(&[score("cloze", f64::NAN), score("prose", 3.0)])
            .unwrap_err()
            .contains("not finite on `cloze`"));
        // The stored copy reads back to the same config; the files form is unchanged.
        assert_eq!(toml::from_str::<SearchConfig>(&c.to_toml()).unwrap(), c);
        let f = parse("objective = [\"x.txt\"]\n").unwrap();
        assert!(
            f.to_toml().contains("objective = [\"x.txt\"]"),
            "{}",
            f.to_toml()
        );
        assert_eq!(f.objective().sets, vec![("x".to_string(), 1.0)]);

        // Mistakes are named (before anything is opened: a and b do not exist).
        let e = parse("objective = \"x.txt\"\n").unwrap_err().to_string();
        assert!(
            e.contains("a list of held-out files") && e.contains("table of set names"),
            "{e}"
        );
        let refused = |data: &str, needle: &str| {
            let e = parse(data).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{data}: {e}");
        };
        refused("objective = {}\n", "data.objective is an empty table");
        refused(
            "objective = { prose = 1 }\nextra = { code = [\"c.txt\"] }\n",
            "data.objective names `prose`, which is in neither",
        );
        refused(
            "objective = { prose = 0 }\nextra = { prose = [\"p.txt\"] }\n",
            "data.objective.prose = 0: a weight must be a positive number",
        );
        refused(
            "objective = { prose = -1 }\nextra = { prose = [\"p.txt\"] }\n",
            "a weight must be a positive number",
        );
        refused(
            "objective = { prose = 1 }\nextra = { prose = [\"p.txt\"] }\ntasks = { prose = \"p.jsonl\" }\n",
            "`prose` is both in data.extra and in data.tasks",
        );
        refused(
            "objective = [\"d/cloze.txt\"]\ntasks = { cloze = \"p.jsonl\" }\n",
            "reuses the objective's name `cloze`",
        );
    }

    #[test]
    fn a_checkpoint_listed_twice_is_refused_even_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        std::os::unix::fs::symlink(&a, dir.path().join("link")).unwrap();
        let c: SearchConfig = toml::from_str(&format!(
            "checkpoints = [{:?}, {:?}]\n[data]\nobjective = [\"x\"]\n",
            a,
            dir.path().join("link")
        ))
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("checkpoints[0] and checkpoints[1] are the same directory"),
            "{e}"
        );
    }

    #[test]
    fn unusable_numbers_are_refused_by_name_before_anything_runs() {
        let base = "checkpoints = [\"a\", \"b\"]\n[data]\nobjective = [\"x\"]\n";
        let refused = |extra: &str, needle: &str| {
            let c: SearchConfig = toml::from_str(&format!("{base}{extra}")).unwrap();
            // validate() checks the numbers before it opens anything (a and b do not exist).
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        };
        for field in ["deadline_s", "load_deadline_s", "heartbeat_s", "wait_s"] {
            for v in ["-1.0", "0.0", "nan", "inf", "1e300"] {
                refused(
                    &format!("[workers]\n{field} = {v}\n"),
                    &format!("workers.{field} = "),
                );
            }
        }
        refused(
            "[workers]\nheartbeat_timeout_s = -1.0\n",
            "workers.heartbeat_timeout_s = -1",
        );
        refused(
            "[workers]\nheartbeat_s = 40.0\n",
            "not above workers.heartbeat_s",
        );
        refused("[search]\nmax_seconds = nan\n", "search.max_seconds = NaN");
        refused(
            "[search]\nconverge_tol = nan\n",
            "search.converge_tol = NaN",
        );
        refused("[workers]\nmax_attempts = 0\n", "workers.max_attempts = 0");
        refused("[workers]\nlocal = 0\n", "workers.local = 0");
        // Keys of the [data] table (the base config ends inside it).
        refused("batch = 0\n", "data.batch = 0");
        refused("seq_len = 1\n", "data.seq_len = 1");
        for m in ["-0.001", "nan", "inf"] {
            refused(
                &format!("[search]\nearly_stop = true\nearly_stop_margin = {m}\n"),
                "search.early_stop_margin = ",
            );
        }
        refused(
            "[search]\nearly_stop_margin = 0.001\n",
            "search.early_stop is not",
        );
    }

    /// Issue 14, item 15: bad data content (a malformed line, too few tokens for one
    /// window, a foreign token, a cut-off binary file) surfaced only when each worker
    /// loaded; validation now reads the data as the workers will and names the file.
    #[test]
    fn bad_data_content_is_refused_by_validation() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trajectory");
        let dir = tempfile::tempdir().unwrap();
        let refused = |file: &str, bytes: &[u8], needle: &str| {
            let f = dir.path().join(file);
            std::fs::write(&f, bytes).unwrap();
            let c: SearchConfig = toml::from_str(&format!(
                "checkpoints = [{:?}, {:?}]\n[data]\nobjective = [{:?}]\nseq_len = 64\n",
                fx.join("llama/step-1250"),
                fx.join("llama/step-1500"),
                f
            ))
            .unwrap();
            let e = format!("{:#}", c.validate().unwrap_err());
            let stem = file.split('.').next().unwrap(); // the data set's name
            assert!(e.contains(needle) && e.contains(stem), "{file}: {e}");
        };
        let prose = std::fs::read_to_string(fx.join("data/heldout.txt")).unwrap();
        refused(
            "lines.jsonl",
            b"{\"text\": \"fine\"}\n{\"txt\": \"typo\"}\n",
            "line 2: no string field \"text\"",
        );
        refused("short.txt", b"Too short.", "fewer than one window of 64");
        refused("odd.bin", &[1, 0, 2], "not a whole number of 16-bit tokens");
        refused(
            "foreign.bin",
            &u16::MAX.to_le_bytes().repeat(100),
            "outside the model's vocabulary",
        );
        // And good data passes, extra sets included.
        let ok = dir.path().join("ok.txt");
        std::fs::write(&ok, &prose).unwrap();
        let c: SearchConfig = toml::from_str(&format!(
            "checkpoints = [{:?}, {:?}]\n[data]\nobjective = [{:?}]\nseq_len = 64\nextra = {{ docs = [{:?}] }}\n",
            fx.join("llama/step-1250"),
            fx.join("llama/step-1500"),
            ok,
            fx.join("data/python-docs.txt"),
        ))
        .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let e = toml::from_str::<SearchConfig>(
            "checkpoints = []\n[data]\nobjective = []\nseqlen = 3\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("seqlen"), "{e}");
        let mut c: SearchConfig =
            toml::from_str("checkpoints = [\"a\", \"b\", \"c\"]\n[data]\nobjective = [\"x\"]\n")
                .unwrap();
        let e = c.search_space().unwrap_err().to_string();
        assert!(e.contains("exactly two") && e.contains("simplex"), "{e}");
        c.search.acquisition = "ucb2".into();
        assert!(c.bo_config().unwrap_err().to_string().contains("ucb2"));
    }

    #[test]
    fn family_spaces_are_spelt_as_the_averages_are() {
        let ckpts = "checkpoints = [\"a\", \"b\", \"c\", \"d\"]\n[data]\nobjective = [\"x\"]\n";
        for (kind, family) in [
            ("ema", Family::Ema),
            ("wma", Family::Wma),
            ("window", Family::Window),
            ("minus-sqrt", Family::MinusSqrt),
        ] {
            let c: SearchConfig =
                toml::from_str(&format!("{ckpts}[space]\nkind = \"{kind}\"\n")).unwrap();
            assert_eq!(
                c.search_space().unwrap(),
                SearchSpace::Family { family, n: 4 },
                "{kind}"
            );
        }
        let e = toml::from_str::<SearchConfig>(&format!(
            "{ckpts}[space]\nkind = \"ema\"\ndecay = 0.5\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("decay"), "{e}");
        let c: SearchConfig = toml::from_str(
            "checkpoints = [\"a\"]\n[data]\nobjective = [\"x\"]\n[space]\nkind = \"window\"\n",
        )
        .unwrap();
        let e = c.search_space().unwrap_err().to_string();
        assert!(e.contains("at least two checkpoints"), "{e}");
    }

    #[test]
    fn resume_conflicts_name_the_objective_fields_only() {
        let a: SearchConfig =
            toml::from_str("checkpoints = [\"a\", \"b\"]\n[data]\nobjective = [\"x\"]\n").unwrap();
        let mut b = a.clone();
        b.search.max_evals = 50;
        b.workers.addresses = vec!["h:1".into()];
        assert!(a.resume_conflicts(&b).is_empty());
        b.data.window.seq_len = Some(64);
        b.search.seed = 3;
        let c = a.resume_conflicts(&b);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].starts_with("data") && c[1].starts_with("seed"));
        // The margin decides which trials stop: a run cannot go on under another one.
        let (mut r, mut m) = (a.clone(), a.clone());
        r.search.early_stop = true;
        m.search.early_stop = true;
        m.search.early_stop_margin = 0.001;
        let c = r.resume_conflicts(&m);
        assert!(c.len() == 1 && c[0].contains("margin"), "{c:?}");
    }
}
