//! The in-memory merge-and-evaluate API: load N source checkpoints and tokenize the data
//! once; then each [`Evaluator::evaluate`] merges the sources into resident f32 weights
//! with the merge kernel and runs the forward pass, with no disk I/O. A distributed
//! worker serves exactly this.
//!
//! The merged weights are rounded to each tensor's source dtype before being widened to
//! f32 (`weighted_sum_to_f32`), so the score is the score of the model `ckmerge merge`
//! writes for the same weights, not of an unrounded f32 merge.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckmerge_common::protocol::{
    ChoiceRow, DatasetScore, DatasetSpec, PipelineStage, SetKind, TaskMetrics,
};
use ckmerge_common::{
    check_compatible, Checkpoint, CheckpointError, DType, GroupMap, Grouping, MergeWeights,
    WindowSpec,
};
use ckmerge_kernels::{weighted_sum_to_f32, Input};

use crate::data::{self, DataError, TextTokenizer, Window};
use crate::gpu::GpuModel;
use crate::model::{ConfigError, Model, ModelConfig, ParamStore, Part, WeightError};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{dir}: {cause}")]
    Weights { dir: PathBuf, cause: WeightError },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Gpu(#[from] ckmerge_kernels::cuda::GpuError),
}

/// Activation memory allowed for running one batch per thread at once.
const PARALLEL_BATCH_BYTES: usize = 1 << 30;

/// How to cut the data into windows and batch them.
#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// How the data is cut into windows and batched.
    pub window: WindowSpec,
    /// Tensor groups for per-group weights; None: one weight vector for every tensor.
    pub groups: Option<Grouping>,
    /// Hold only this pipeline stage (see [`Part::stage`]): its layers' tensors, and data
    /// only on the first stage. None: the whole model.
    pub stage: Option<PipelineStage>,
    /// Hold the sources on these GPUs (CUDA ordinals) and evaluate there; None: CPU.
    pub gpus: Option<Vec<usize>>,
}

pub use crate::data::Batch;
pub use crate::model::StageOutput;

/// A tokenized data set and its windows, or a multiple-choice task and its requests.
pub struct Dataset {
    pub name: String,
    tokens: Vec<u32>,
    pub windows: Vec<Window>,
    /// A task (then `tokens` and `windows` are empty).
    pub task: Option<crate::choice::Task>,
    /// A task's items in the order a race scores them ([`Evaluator::shuffle_units`]);
    /// empty: file order.
    item_order: Vec<usize>,
}

impl Dataset {
    /// Tokens read; for a task, the tokens of all its requests (what one scoring runs
    /// through the model).
    pub fn tokens(&self) -> usize {
        match &self.task {
            Some(t) => t.requests.iter().map(|r| r.input.len()).sum(),
            None => self.tokens.len(),
        }
    }

    /// Windows of a text, requests (items times choices) of a task.
    pub fn units(&self) -> usize {
        match &self.task {
            Some(t) => t.requests.len(),
            None => self.windows.len(),
        }
    }
}

/// One data set scored: its score and what it cost.
#[derive(Clone, Debug)]
pub struct SetResult {
    pub score: DatasetScore,
    pub seconds: f64,
    /// Tokens through the forward pass (scored or context).
    pub forward_tokens: usize,
}

/// Score of one model on one data set.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct EvalResult {
    /// Tokens scored (predicted), not tokens read.
    pub tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub seconds: f64,
    /// Tokens through the forward pass per second (scored or context).
    pub tokens_per_s: f64,
    /// Tokens through the forward pass (scored or context).
    pub forward_tokens: usize,
}

impl EvalResult {
    /// This result as the protocol's score of text set `name`.
    pub fn score(&self, name: &str) -> DatasetScore {
        DatasetScore {
            name: name.to_string(),
            tokens: self.tokens,
            mean_nll: self.mean_nll,
            perplexity: self.perplexity,
            task: None,
        }
    }
}

/// One source checkpoint held in memory: per store tensor, its dtype and bytes.
struct Source {
    tensors: Vec<(DType, Vec<u8>)>,
}

/// The CPU backend: sources in host memory, merged f32 weights, the reference model.
struct Cpu {
    sources: Vec<Source>,
    store: ParamStore,
    model: Model,
}

/// Where the sources live and the forward pass runs.
enum Backend {
    Cpu(Box<Cpu>),
    Gpu(Box<GpuModel>),
}

/// Resident sources, merged weights, model and data.
pub struct Evaluator {
    backend: Backend,
    config: ModelConfig,
    part: Part,
    /// Tensor names, in the order group assignments index them.
    names: Vec<String>,
    /// The group of each tensor (all in one without groups).
    groups: GroupMap,
    n_sources: usize,
    pub seq_len: usize,
    batch: usize,
    pub datasets: Vec<Dataset>,
    /// The weights the resident merged copy was made with.
    weights: Option<MergeWeights>,
    /// Seconds spent loading sources and tokenizing.
    pub load_seconds: f64,
}

/// The window length an evaluator of `config` uses under `win` (`seq_len`, else the
/// model's context up to 2048), refused where the model cannot score it.
pub fn window_length(config: &ModelConfig, win: &WindowSpec) -> Result<usize, EvalError> {
    win.check().map_err(EvalError::Request)?;
    let seq_len = win.seq_len.unwrap_or(config.max_positions.min(2048));
    if seq_len > config.max_positions {
        return Err(EvalError::Request(format!(
            "--seq-len {seq_len} exceeds the model's max_position_embeddings ({})",
            config.max_positions
        )));
    }
    if let Some(w) = config.sliding_window.filter(|&w| seq_len > w) {
        return Err(EvalError::Request(format!(
            "--seq-len {seq_len} exceeds the model's sliding window ({w}); sliding-window attention is not implemented, so use --seq-len {w} or less"
        )));
    }
    Ok(seq_len)
}

/// Reads, tokenizes (with the tokenizer in `tokenizer_dir`) and cuts into windows each
/// data set: everything that can be wrong with the data is found here. The search's
/// config validation calls this too, so that bad data is refused before any worker is
/// asked to load it.
pub fn load_datasets(
    tokenizer_dir: &Path,
    config: &ModelConfig,
    datasets: &[DatasetSpec],
    win: &WindowSpec,
    seq_len: usize,
) -> Result<Vec<Dataset>, EvalError> {
    let tok_dir = tokenizer_dir.to_owned();
    let tokenizer = move || TextTokenizer::load(&tok_dir);
    let mut sets = Vec::new();
    for DatasetSpec { name, files, kind } in datasets {
        if *kind == SetKind::Task {
            let [file] = files.as_slice() else {
                return Err(EvalError::Request(format!(
                    "task `{name}` lists {} files; a multiple-choice task is one JSONL file",
                    files.len()
                )));
            };
            let items = crate::choice::load_items(file)?;
            let requests =
                crate::choice::requests(&items, &tokenizer()?, config.max_positions, file)?;
            sets.push(Dataset {
                name: name.clone(),
                tokens: Vec::new(),
                windows: Vec::new(),
                task: Some(crate::choice::Task {
                    name: name.clone(),
                    path: file.clone(),
                    items,
                    requests,
                }),
                item_order: Vec::new(),
            });
            continue;
        }
        let mut tokens = data::load_tokens(files, &tokenizer, config.vocab, win.token_bits)?;
        if let Some(m) = win.max_tokens {
            tokens.truncate(m);
        }
        let windows = data::windows(tokens.len(), seq_len, win.stride)?;
        sets.push(Dataset {
            name: name.clone(),
            tokens,
            windows,
            task: None,
            item_order: Vec::new(),
        });
    }
    Ok(sets)
}

impl Evaluator {
    /// Loads `checkpoints` into memory and tokenizes each data set (each a list of files
    /// or directories, named by `names`). Everything is validated here.
    pub fn load(
        checkpoints: &[PathBuf],
        datasets: &[DatasetSpec],
        opts: &EvalOptions,
    ) -> Result<Evaluator, EvalError> {
        let t0 = Instant::now();
        if checkpoints.is_empty() {
            return Err(EvalError::Request("no checkpoints given".into()));
        }
        let first_stage = opts.stage.is_none_or(|s| s.index == 0);
        // No data set at all is allowed (`ckmerge eval --task` scores tasks alone); an
        // empty one is a mistake.
        if first_stage && datasets.iter().any(|d| d.files.is_empty()) {
            return Err(EvalError::Request("no data given; pass --data FILE".into()));
        }
        let ckpts = checkpoints
            .iter()
            .map(|p| Checkpoint::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        check_compatible(&ckpts)?;
        let first = &ckpts[0];
        let config = ModelConfig::from_json(&first.config, &first.dir.join("config.json"))?;
        let win = &opts.window;
        let seq_len = window_length(&config, win)?;
        let part = match opts.stage {
            None => Part::whole(&config),
            Some(PipelineStage { index: i, count: n }) if n == 0 || i >= n || n > config.layers => {
                return Err(EvalError::Request(format!(
                    "pipeline stage {i} of {n}: the model has {} layers; use 1 to {} stages",
                    config.layers, config.layers
                )))
            }
            Some(PipelineStage { index, count }) => Part::stage(&config, index, count),
        };

        // Tokenize before copying weights: bad data fails fast. Only the first stage of
        // a pipeline reads data; the others are sent each batch's tokens.
        let sets = if part.first {
            load_datasets(&first.dir, &config, datasets, win, seq_len)?
        } else {
            Vec::new()
        };

        let held: Vec<_> = first
            .tensors
            .iter()
            .filter(|t| part.needs(&config, &t.name))
            .collect();
        let batch = win.batch_or_default();
        let mut names: Vec<String> = held.iter().map(|t| t.name.clone()).collect();
        // Multiple-choice requests may be longer than the windows (up to the model's
        // length): the GPU's rotary tables and activations are sized for the longest.
        let longest = sets
            .iter()
            .filter_map(|d| d.task.as_ref())
            .flat_map(|t| t.requests.iter().map(|r| r.input.len()))
            .max()
            .unwrap_or(0);
        let backend = if let Some(gpus) = &opts.gpus {
            let m = GpuModel::load(
                &ckpts,
                &config,
                &part,
                gpus,
                seq_len.max(longest),
                (batch * seq_len).max(longest),
            )?;
            names = m.tensor_names();
            Backend::Gpu(Box::new(m))
        } else {
            let shapes: Vec<Vec<usize>> = held.iter().map(|t| t.shape.clone()).collect();
            let sources = ckpts
                .iter()
                .map(|c| Source {
                    tensors: names
                        .iter()
                        .map(|n| {
                            let t = c.tensor(n).expect("checked by check_compatible");
                            (t.dtype, c.bytes(t).to_vec())
                        })
                        .collect(),
                })
                .collect();
            let mut store = ParamStore::new(names.clone(), shapes);
            // The f32 working copy is allocated zeroed, which the allocator gives as
            // untouched pages: resident only once the first merge writes it. Touch it
            // now, so the resident memory a worker reports after loading (its table in
            // the report) is what it holds while it evaluates.
            store.data.iter_mut().for_each(|d| d.fill(0.0));
            let model = Model::new_part(config.clone(), &store, seq_len, part.clone()).map_err(
                |cause| EvalError::Weights {
                    dir: first.dir.clone(),
                    cause,
                },
            )?;
            Backend::Cpu(Box::new(Cpu {
                sources,
                store,
                model,
            }))
        };
        let groups = GroupMap::new(opts.groups.as_ref(), &names).map_err(EvalError::Request)?;
        Ok(Evaluator {
            backend,
            config,
            part,
            names,
            groups,
            n_sources: ckpts.len(),
            seq_len,
            batch,
            datasets: sets,
            weights: None,
            load_seconds: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the model runs, for reports: "cpu" or the GPUs and their layer ranges.
    pub fn device(&self) -> String {
        match &self.backend {
            Backend::Cpu(_) => "cpu".into(),
            Backend::Gpu(m) => m.description.clone(),
        }
    }

    /// Merges the sources with one weight vector for every tensor (see
    /// [`Evaluator::merge`]).
    pub fn set_weights(&mut self, weights: &[f32]) -> Result<(), EvalError> {
        self.merge(&MergeWeights::single(weights.to_vec()))
    }

    /// Merges the sources into the resident weights: tensor `i` with the vector of its
    /// group (or the single vector for every tensor). Nothing is done when the resident
    /// copy was already made with these weights.
    pub fn merge(&mut self, weights: &MergeWeights) -> Result<(), EvalError> {
        weights
            .check(self.n_sources, &self.groups)
            .map_err(EvalError::Request)?;
        if self.weights.as_ref() == Some(weights) {
            return Ok(());
        }
        match &mut self.backend {
            Backend::Cpu(cpu) => {
                for (i, out) in cpu.store.data.iter_mut().enumerate() {
                    let inputs: Vec<Input> = cpu
                        .sources
                        .iter()
                        .map(|s| Input::new(s.tensors[i].0, &s.tensors[i].1))
                        .collect();
                    let round_to = cpu.sources[0].tensors[i].0;
                    weighted_sum_to_f32(
                        &inputs,
                        weights.for_tensor(&self.groups, i),
                        round_to,
                        out,
                    );
                }
            }
            Backend::Gpu(m) => {
                let single = GroupMap::single(self.names.len());
                let map = if weights.is_single() {
                    &single
                } else {
                    &self.groups
                };
                m.set_groups(map.as_slice())?;
                m.merge(weights.groups())?;
            }
        }
        self.weights = Some(weights.clone());
        Ok(())
    }

    /// Names of the tensors, in the order group assignments index them.
    pub fn tensor_names(&self) -> &[String] {
        &self.names
    }

    /// The batches of data set `d`: windows of equal shape, at most `batch` per batch
    /// (with a stride only the last window may differ), in window order.
    pub fn batches(&self, d: usize) -> Vec<Batch> {
        let set = &self.datasets[d];
        let mut out = Vec::new();
        let mut i = 0;
        while i < set.windows.len() {
            let w0 = set.windows[i];
            let mut j = i + 1;
            while j < set.windows.len()
                && j - i < self.batch
                && set.windows[j].len == w0.len
                && set.windows[j].scored == w0.scored
            {
                j += 1;
            }
            let mut tokens = Vec::with_capacity((j - i) * w0.len);
            for w in &set.windows[i..j] {
                tokens.extend_from_slice(&set.tokens[w.start..w.start + w.len]);
            }
            out.push(Batch {
                tokens,
                seq: w0.len,
                scored: w0.scored,
            });
            i = j;
        }
        out
    }

    /// Puts the units of data set `d` in the fixed random order of `seed` (see
    /// [`ckmerge_common::race`]): a text's windows (its batches are then scored in that
    /// order), a task's items for [`Evaluator::score_race`]; any prefix of them is then a
    /// simple random sample of the set.
    pub fn shuffle_units(&mut self, d: usize, seed: u64) {
        let set = &mut self.datasets[d];
        match &set.task {
            Some(t) => set.item_order = ckmerge_common::race::permutation(t.items.len(), seed),
            None => {
                let p = ckmerge_common::race::permutation(set.windows.len(), seed);
                set.windows = p.iter().map(|&i| set.windows[i]).collect();
            }
        }
    }

    /// Scores the current weights on data set `d` (whole model).
    pub fn score(&self, d: usize) -> Result<EvalResult, EvalError> {
        let t0 = Instant::now();
        let batches = self.text_batches(d)?;
        let parts = self.run_batches(&batches)?;
        Ok(Self::result(&batches, &parts, t0.elapsed().as_secs_f64()))
    }

    /// Scores the objective, data sets `0..k`, racing against `race` (see
    /// [`ckmerge_common::race`]): each set's units (a text's windows, one per forward
    /// pass; a task's items) in their order, at each look every set up to the look's
    /// share, then the test; a candidate clearly worse than the incumbent or the leader
    /// (or not better by more than `race.margin`), or clearly better than the best known,
    /// stops there ([`ckmerge_common::race::decide`]).
    /// Returns each set's result (for a stopped trial: what was scored, and the estimate
    /// of the whole set's mean, the incumbent's plus the estimated difference), every
    /// scored unit's value, set after set, and how far a stopped trial got. An empty
    /// `race.incumbent` scores everything (the units make the next incumbent).
    pub fn score_race(
        &mut self,
        k: usize,
        race: &ckmerge_common::race::Race,
    ) -> Result<Raced, EvalError> {
        self.score_race_with(
            k,
            race,
            &mut |ev, batches| ev.run_batches(batches),
            &mut |ev, requests| ev.score_choices(requests),
        )
    }

    /// [`Evaluator::score_race`] with a text's windows scored by `run` (given this
    /// evaluator and the next windows, one per batch, it returns their NLL sums in order)
    /// and a task's choices by `choices` (as [`Evaluator::score_choices`]): the head of a
    /// pipeline passes them through its stages.
    pub fn score_race_with(
        &mut self,
        k: usize,
        race: &ckmerge_common::race::Race,
        run: &mut WindowRunner,
        choices: &mut ChoiceRunner,
    ) -> Result<Raced, EvalError> {
        use ckmerge_common::race;
        let t0 = Instant::now();
        assert!(self.weights.is_some(), "set_weights before score_race");
        if k == 0 || k > self.datasets.len() {
            return Err(EvalError::Request(format!(
                "an objective of {k} sets raced on a worker holding {}",
                self.datasets.len()
            )));
        }
        let mut strata: Vec<Stratum> = (0..k).map(|d| self.stratum(d)).collect::<Result<_, _>>()?;
        let units: Vec<usize> = strata.iter().map(|s| s.units).collect();
        let weights = match race.weights.len() {
            0 if k == 1 => vec![1.0],
            n if n == k => race.weights.clone(),
            n => {
                return Err(EvalError::Request(format!(
                    "the race has {n} objective weights for an objective of {k} sets"
                )))
            }
        };
        let inc: Vec<&[f64]> = match race.incumbent.is_empty() {
            true => vec![&[]; k],
            false => split_sets(&race.incumbent, &units, &units).ok_or_else(|| {
                EvalError::Request(format!(
                    "the incumbent has {} units where this objective has {} (windows of text, items of tasks): the workers disagree on the data",
                    race.incumbent.len(),
                    units.iter().sum::<usize>()
                ))
            })?,
        };
        if !race.own.is_empty() {
            // A leader's confirmation: its units (and a task's choices) scored so far are
            // taken as they are.
            let own = split_sets(&race.own, &race.own_scored, &units)
                .filter(|_| race.incumbent.is_empty())
                .ok_or_else(|| {
                    EvalError::Request(format!(
                        "a continued trial has {} units scored as {:?} of sets of {units:?} units (and must be scored whole): the workers disagree on the data",
                        race.own.len(),
                        race.own_scored
                    ))
                })?;
            let mut choices = race.own_choices.iter();
            for (d, (s, own)) in strata.iter_mut().zip(own).enumerate() {
                if let StratumKind::Task {
                    order,
                    requests,
                    results,
                } = &mut s.kind
                {
                    for &it in &order[..own.len()] {
                        for &i in &requests[it] {
                            results[i] = *choices.next().ok_or_else(|| {
                                EvalError::Request(format!(
                                    "a continued trial has {} choice results, too few for the items it scored of set {d}",
                                    race.own_choices.len()
                                ))
                            })?;
                        }
                    }
                }
                s.values.extend_from_slice(own);
            }
            if choices.next().is_some() {
                return Err(EvalError::Request(format!(
                    "a continued trial has {} choice results, more than the items it scored",
                    race.own_choices.len()
                )));
            }
        }
        let has_leader = !race.leader.is_empty();
        let leader: Vec<&[f64]> = match has_leader {
            false => Vec::new(),
            true => split_sets(&race.leader, &race.leader_scored, &units)
                .filter(|_| !race.incumbent.is_empty())
                .ok_or_else(|| {
                    EvalError::Request(format!(
                        "the leader has {} units scored as {:?} of sets of {units:?} units: the workers disagree on the data",
                        race.leader.len(),
                        race.leader_scored
                    ))
                })?,
        };
        let mut looks = if race.incumbent.is_empty() {
            Vec::new()
        } else {
            let min = |s: &Stratum| match s.kind {
                StratumKind::Text { .. } => race::MIN_UNITS,
                StratumKind::Task { .. } => race::MIN_ITEMS,
            };
            race::look_plan(&strata.iter().map(|s| (s.units, min(s))).collect::<Vec<_>>())
        };
        looks.push((units.clone(), 0));
        for (n, look) in looks {
            for (d, s) in strata.iter_mut().enumerate() {
                self.advance(d, s, n[d], run, choices)?;
            }
            if n == units {
                break;
            }
            let sets = paired(&strata, &inc, &weights);
            // The leader where it scored every unit scored so far.
            let within = has_leader && leader.iter().zip(&n).all(|(l, &n)| l.len() >= n);
            let vs_leader = within.then(|| paired(&strata, &leader, &weights));
            let stop = race::decide(
                &sets,
                vs_leader.as_deref(),
                has_leader,
                race.z[look],
                race.margin,
            );
            if let Some((mut p, each)) = stop {
                if p.better {
                    p.choices = strata.iter().flat_map(Stratum::choices).collect();
                }
                let seconds = t0.elapsed().as_secs_f64();
                let sets = (0..k)
                    .map(|d| {
                        let s = &strata[d];
                        let inc_mean = inc[d].iter().sum::<f64>() / s.tokens as f64;
                        self.stopped_set(d, s, inc_mean + each[d], seconds)
                    })
                    .collect();
                let values = strata.into_iter().flat_map(|s| s.values).collect();
                return Ok(Raced {
                    sets,
                    units: values,
                    partial: Some(p),
                    versus_leader: None,
                });
            }
        }
        // Scored whole after racing a leader: the difference from it on its units, for
        // the coordinator to tell whether this trial was shown better than it.
        let z = race.z[race::LOOKS.len() - 1];
        let versus_leader = has_leader
            .then(|| race::versus(&paired(&strata, &leader, &weights), z))
            .flatten();
        let seconds = t0.elapsed().as_secs_f64();
        let sets = (0..k)
            .map(|d| self.whole_set(d, &strata[d], seconds))
            .collect();
        Ok(Raced {
            sets,
            units: strata.into_iter().flat_map(|s| s.values).collect(),
            partial: None,
            versus_leader,
        })
    }

    /// Set `d` as a stratum of a race, nothing scored yet.
    fn stratum(&self, d: usize) -> Result<Stratum, EvalError> {
        let set = &self.datasets[d];
        Ok(match &set.task {
            Some(t) => {
                let order = match set.item_order.is_empty() {
                    true => (0..t.items.len()).collect(),
                    false => set.item_order.clone(),
                };
                let mut requests = vec![Vec::new(); t.items.len()];
                for (i, r) in t.requests.iter().enumerate() {
                    requests[r.item].push(i);
                }
                Stratum {
                    units: t.items.len(),
                    tokens: t.items.len(),
                    values: Vec::new(),
                    kind: StratumKind::Task {
                        order,
                        requests,
                        results: vec![(0.0, false); t.requests.len()],
                    },
                }
            }
            None => {
                // One window per batch: the windows are the test's units, so a look can
                // come after a few dozen of them on a small set too.
                let batches: Vec<Batch> = self
                    .text_batches(d)?
                    .into_iter()
                    .flat_map(|b| {
                        let (seq, scored) = (b.seq, b.scored);
                        b.tokens
                            .chunks(seq)
                            .map(|w| Batch {
                                tokens: w.to_vec(),
                                seq,
                                scored,
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                Stratum {
                    units: batches.len(),
                    tokens: batches.iter().map(|b| b.scored).sum(),
                    values: Vec::new(),
                    kind: StratumKind::Text { batches },
                }
            }
        })
    }

    /// Scores set `d`'s next units, up to `n` of them.
    fn advance(
        &mut self,
        d: usize,
        s: &mut Stratum,
        n: usize,
        run: &mut WindowRunner,
        choices: &mut ChoiceRunner,
    ) -> Result<(), EvalError> {
        let from = s.values.len();
        if n <= from {
            return Ok(());
        }
        match &mut s.kind {
            StratumKind::Text { batches } => {
                let v = run(self, &batches[from..n])?;
                if v.len() != n - from {
                    return Err(EvalError::Request(format!(
                        "{} NLL sums came back for {} windows",
                        v.len(),
                        n - from
                    )));
                }
                s.values.extend(v);
            }
            StratumKind::Task {
                order,
                requests,
                results,
            } => {
                let task = self.datasets[d].task.take().expect("a task");
                let idx: Vec<usize> = order[from..n]
                    .iter()
                    .flat_map(|&it| requests[it].iter().copied())
                    .collect();
                let chunk: Vec<crate::choice::Request> =
                    idx.iter().map(|&i| task.requests[i].clone()).collect();
                let r = choices(self, &chunk);
                self.datasets[d].task = Some(task);
                for (&i, v) in idx.iter().zip(r?) {
                    results[i] = v;
                }
                let task = self.datasets[d].task.as_ref().expect("a task");
                for &it in &order[from..n] {
                    let lls: Vec<f64> = requests[it].iter().map(|&i| results[i].0).collect();
                    let mut by_choice = vec![0.0; lls.len()];
                    for (&i, ll) in requests[it].iter().zip(&lls) {
                        by_choice[task.requests[i].choice] = *ll;
                    }
                    s.values
                        .push(crate::choice::choice_nll(&by_choice, task.items[it].gold));
                }
            }
        }
        Ok(())
    }

    /// Set `d` scored whole in a race.
    fn whole_set(&self, d: usize, s: &Stratum, seconds: f64) -> SetResult {
        let name = &self.datasets[d].name;
        match &s.kind {
            StratumKind::Text { batches } => {
                let r = Self::result(batches, &s.values, seconds);
                SetResult {
                    score: r.score(name),
                    seconds,
                    forward_tokens: r.forward_tokens,
                }
            }
            StratumKind::Task { results, .. } => {
                let task = self.datasets[d].task.as_ref().expect("a task");
                self.task_result(d, &crate::choice::score(task, results), seconds)
            }
        }
    }

    /// Set `d` when a race stopped: what was scored, with `estimate` as its mean (the
    /// incumbent's plus the estimated difference); a task's accuracies are over the items
    /// scored, `items` says how many.
    fn stopped_set(&self, d: usize, s: &Stratum, estimate: f64, seconds: f64) -> SetResult {
        let name = &self.datasets[d].name;
        let n = s.values.len();
        let (tokens, forward_tokens, task) = match &s.kind {
            StratumKind::Text { batches } => {
                let done = &batches[..n];
                (
                    done.iter().map(|b| b.scored).sum(),
                    done.iter().map(|b| b.tokens.len()).sum(),
                    None,
                )
            }
            StratumKind::Task {
                order,
                requests,
                results,
            } => {
                let task = self.datasets[d].task.as_ref().expect("a task");
                let items: Vec<usize> = order[..n].to_vec();
                let reqs: Vec<usize> = items
                    .iter()
                    .flat_map(|&it| requests[it].iter().copied())
                    .collect();
                let sub = crate::choice::Task {
                    name: task.name.clone(),
                    path: task.path.clone(),
                    items: items.iter().map(|&it| task.items[it].clone()).collect(),
                    requests: reqs
                        .iter()
                        .map(|&i| {
                            let r = &task.requests[i];
                            crate::choice::Request {
                                item: items.iter().position(|&it| it == r.item).expect("scored"),
                                ..r.clone()
                            }
                        })
                        .collect(),
                };
                let res: Vec<(f64, bool)> = reqs.iter().map(|&i| results[i]).collect();
                let sc = crate::choice::score(&sub, &res);
                (
                    sub.requests.iter().map(|r| r.targets.len()).sum(),
                    sub.requests.iter().map(|r| r.input.len()).sum(),
                    Some(TaskMetrics {
                        items: sc.items,
                        acc: sc.acc,
                        acc_norm: sc.acc_norm,
                        gold_ll: sc.gold_ll,
                    }),
                )
            }
        };
        SetResult {
            score: DatasetScore {
                name: name.clone(),
                tokens,
                mean_nll: estimate,
                perplexity: estimate.exp(),
                task,
            },
            seconds,
            forward_tokens,
        }
    }

    /// The batches of text set `d`; a task is refused.
    fn text_batches(&self, d: usize) -> Result<Vec<Batch>, EvalError> {
        assert!(self.weights.is_some(), "set_weights before score");
        if self.datasets[d].task.is_some() {
            return Err(EvalError::Request(format!(
                "`{}` is a multiple-choice task: score it with score_task",
                self.datasets[d].name
            )));
        }
        Ok(self.batches(d))
    }

    /// Each batch's summed NLL under the current weights, in batch order.
    fn run_batches(&self, batches: &[Batch]) -> Result<Vec<f64>, EvalError> {
        Ok(match &self.backend {
            Backend::Cpu(cpu) => {
                let run =
                    |b: &Batch| -> f64 { cpu.model.nll(&cpu.store, &b.tokens, b.seq, b.scored) };
                // Small models: one batch per thread, no synchronisation inside a forward
                // pass. Large ones: every thread works on each batch (activations of one
                // batch per thread would not fit). Partial sums are added in window order
                // either way.
                if self.batches_in_parallel() {
                    use rayon::prelude::*;
                    batches.par_iter().map(run).collect()
                } else {
                    batches.iter().map(run).collect()
                }
            }
            Backend::Gpu(m) => {
                let mut out = Vec::with_capacity(batches.len());
                for b in batches {
                    match m.forward(b, None)? {
                        StageOutput::Nll(n) => out.push(n),
                        StageOutput::Hidden(_) | StageOutput::LogProbs(_) => {
                            return Err(EvalError::Request(
                                "score on a pipeline stage: the head drives the pipeline".into(),
                            ))
                        }
                    }
                }
                out
            }
        })
    }

    /// The longest input a multiple-choice request may have on this model: the harness's
    /// `max_length` for a Hugging Face model, `max_position_embeddings`.
    pub fn choice_max_len(&self) -> usize {
        self.config.max_positions
    }

    /// Each request's (log-likelihood, is-greedy) under the current weights, in request
    /// order (see [`crate::choice`]): requests grouped by length ([`length_batches`]),
    /// each group one right-padded forward pass; on the CPU, small models run a group
    /// per thread.
    pub fn score_choices(
        &mut self,
        requests: &[crate::choice::Request],
    ) -> Result<Vec<(f64, bool)>, EvalError> {
        assert!(self.weights.is_some(), "set_weights before score_choices");
        let parallel = self.batches_in_parallel();
        let groups = length_batches(requests, self.batch, self.batch * self.seq_len);
        let rows = |g: &Vec<usize>| -> Vec<(&[u32], &[u32])> {
            g.iter()
                .map(|&i| (&requests[i].input[..], &requests[i].targets[..]))
                .collect()
        };
        let scored: Vec<Vec<(f64, bool)>> = match &mut self.backend {
            Backend::Cpu(cpu) => {
                let longest = requests.iter().map(|r| r.input.len()).max().unwrap_or(0);
                cpu.model.ensure_max_seq(longest);
                let (model, store) = (&cpu.model, &cpu.store);
                let scale = model.norm_head_scale(store);
                let run =
                    |g: &Vec<usize>| model.continuation_logprobs(store, &rows(g), scale.as_deref());
                if parallel {
                    use rayon::prelude::*;
                    groups.par_iter().map(run).collect()
                } else {
                    groups.iter().map(run).collect()
                }
            }
            Backend::Gpu(m) => {
                let longest = requests.iter().map(|r| r.input.len()).max().unwrap_or(0);
                m.ensure_max_seq(longest)?;
                groups
                    .iter()
                    .map(|g| m.continuation_logprobs(&rows(g)))
                    .collect::<Result<_, _>>()?
            }
        };
        let mut out = vec![(0.0, false); requests.len()];
        for (g, s) in groups.iter().zip(scored) {
            for (&i, v) in g.iter().zip(s) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Scores the current weights on task `d` (see [`crate::choice::score`]).
    pub fn score_task(&mut self, d: usize) -> Result<crate::choice::TaskScore, EvalError> {
        self.task_score_with(d, &mut |ev, requests| ev.score_choices(requests))
    }

    /// Task `d` scored with `choices` scoring its requests.
    fn task_score_with(
        &mut self,
        d: usize,
        choices: &mut ChoiceRunner,
    ) -> Result<crate::choice::TaskScore, EvalError> {
        let task = self.datasets[d].task.take().ok_or_else(|| {
            EvalError::Request(format!("`{}` is not a task", self.datasets[d].name))
        })?;
        let r = choices(self, &task.requests);
        let out = r.map(|r| crate::choice::score(&task, &r));
        self.datasets[d].task = Some(task);
        out
    }

    /// Scores the current weights on data set `d`, text or task (whole model).
    pub fn score_set(&mut self, d: usize) -> Result<SetResult, EvalError> {
        let t0 = Instant::now();
        if self.datasets[d].task.is_none() {
            let r = self.score(d)?;
            return Ok(SetResult {
                score: r.score(&self.datasets[d].name),
                seconds: r.seconds,
                forward_tokens: r.forward_tokens,
            });
        }
        let s = self.score_task(d)?;
        Ok(self.task_result(d, &s, t0.elapsed().as_secs_f64()))
    }

    /// Task `d` scored whole, its choices by `choices` (as [`Evaluator::score_choices`]:
    /// a pipeline's head passes them through its stages).
    pub fn score_task_with(
        &mut self,
        d: usize,
        choices: &mut ChoiceRunner,
    ) -> Result<SetResult, EvalError> {
        let t0 = Instant::now();
        let s = self.task_score_with(d, choices)?;
        Ok(self.task_result(d, &s, t0.elapsed().as_secs_f64()))
    }

    /// Task `d`'s score as the protocol's.
    fn task_result(&self, d: usize, s: &crate::choice::TaskScore, seconds: f64) -> SetResult {
        let set = &self.datasets[d];
        let t = set.task.as_ref().expect("a task");
        SetResult {
            score: DatasetScore {
                name: set.name.clone(),
                tokens: t.requests.iter().map(|r| r.targets.len()).sum(),
                mean_nll: s.choice_nll,
                perplexity: s.choice_nll.exp(),
                task: Some(TaskMetrics {
                    items: s.items,
                    acc: s.acc,
                    acc_norm: s.acc_norm,
                    gold_ll: s.gold_ll,
                }),
            },
            seconds,
            forward_tokens: set.tokens(),
        }
    }

    /// Totals per-batch NLL sums (added in batch order, so a pipeline's total equals a
    /// single process's bit for bit) into a result.
    pub fn result(batches: &[Batch], nll: &[f64], seconds: f64) -> EvalResult {
        let (mut total, mut scored, mut through) = (0.0f64, 0usize, 0usize);
        for (b, n) in batches.iter().zip(nll) {
            total += n;
            scored += b.scored * b.tokens.len() / b.seq;
            through += b.tokens.len();
        }
        let mean_nll = total / scored as f64;
        EvalResult {
            tokens: scored,
            mean_nll,
            perplexity: mean_nll.exp(),
            seconds,
            tokens_per_s: through as f64 / seconds,
            forward_tokens: through,
        }
    }

    /// This process's part of a pipeline on one batch: embeds `batch.tokens` (first
    /// stage) or takes `hidden` from the previous stage, runs its layers, and returns the
    /// hidden states for the next stage or, on the last, the batch's summed NLL.
    pub fn stage_forward(
        &self,
        batch: &Batch,
        hidden: Option<Vec<f32>>,
    ) -> Result<StageOutput, EvalError> {
        if self.weights.is_none() {
            return Err(EvalError::Request(
                "stage_forward before set_weights".into(),
            ));
        }
        let part = &self.part;
        if batch.seq < 2
            || batch.scored >= batch.seq
            || !batch.tokens.len().is_multiple_of(batch.seq)
            || batch.seq > self.seq_len
        {
            return Err(EvalError::Request(format!(
                "bad batch shape: {} tokens, windows of {}, {} scored (this stage was loaded for windows of {})",
                batch.tokens.len(), batch.seq, batch.scored, self.seq_len
            )));
        }
        let hidden = self.stage_input(batch, hidden)?;
        let cpu = match &self.backend {
            Backend::Cpu(cpu) => cpu,
            Backend::Gpu(m) => return Ok(m.forward(batch, hidden)?),
        };
        let mut x = match hidden {
            None => cpu.model.embed(&cpu.store, &batch.tokens),
            Some(x) => x,
        };
        cpu.model.forward_layers(&cpu.store, &mut x, batch.seq);
        Ok(if part.last {
            StageOutput::Nll(cpu.model.head_nll(
                &cpu.store,
                &x,
                &batch.tokens,
                batch.seq,
                batch.scored,
            ))
        } else {
            StageOutput::Hidden(x)
        })
    }

    /// [`Evaluator::stage_forward`] on multiple-choice requests: `batch` holds one
    /// right-padded row of `batch.seq` tokens per entry of `rows`
    /// ([`crate::model::continuation_tokens`]); the last stage returns each row's
    /// continuation log-likelihood and greedy flag, as the whole model's
    /// [`Evaluator::score_choices`] does (the same groups, the same arithmetic), on the
    /// CPU or the GPU.
    pub fn stage_forward_choices(
        &mut self,
        batch: &Batch,
        rows: &[ChoiceRow],
        hidden: Option<Vec<f32>>,
    ) -> Result<StageOutput, EvalError> {
        if self.weights.is_none() {
            return Err(EvalError::Request(
                "stage_forward before set_weights".into(),
            ));
        }
        let vocab = self.config.vocab as u32;
        let (seq, n) = (batch.seq, batch.tokens.len());
        let bad_row = rows.iter().find(|r| {
            r.targets.is_empty()
                || r.targets.len() > r.input_len
                || r.input_len > seq
                || r.targets.iter().any(|&t| t >= vocab)
        });
        let positions = self.config.max_positions;
        if seq > positions {
            // The head cuts requests to the model's positions; longer rows would need
            // rotary tables past the model's.
            return Err(EvalError::Request(format!(
                "bad multiple-choice batch: rows of {seq} tokens, longer than the model's {positions} positions"
            )));
        }
        if rows.is_empty() || seq == 0 || n != rows.len() * seq || bad_row.is_some() {
            return Err(EvalError::Request(format!(
                "bad multiple-choice batch: {n} tokens, {} rows of {seq}{}",
                rows.len(),
                bad_row.map_or(String::new(), |r| format!(
                    ", a row of input {} with {} targets",
                    r.input_len,
                    r.targets.len()
                ))
            )));
        }
        let hidden = self.stage_input(batch, hidden)?;
        let last = self.part.last;
        let rows: Vec<(usize, &[u32])> =
            rows.iter().map(|r| (r.input_len, &r.targets[..])).collect();
        let cpu = match &mut self.backend {
            Backend::Cpu(cpu) => cpu,
            Backend::Gpu(m) => {
                m.ensure_max_seq(seq)?;
                return Ok(m.choices(&batch.tokens, seq, hidden, &rows)?);
            }
        };
        cpu.model.ensure_max_seq(seq);
        let mut x = match hidden {
            None => cpu.model.embed(&cpu.store, &batch.tokens),
            Some(x) => x,
        };
        cpu.model.forward_layers(&cpu.store, &mut x, seq);
        if !last {
            return Ok(StageOutput::Hidden(x));
        }
        let scale = cpu.model.norm_head_scale(&cpu.store);
        Ok(StageOutput::LogProbs(cpu.model.continuation_head(
            &cpu.store,
            &x,
            seq,
            &rows,
            scale.as_deref(),
        )))
    }

    /// The groups [`Evaluator::score_choices`] scores `requests` in (indices into them,
    /// by length): a pipeline's head sends the same groups through its stages.
    pub fn choice_groups(&self, requests: &[crate::choice::Request]) -> Vec<Vec<usize>> {
        length_batches(requests, self.batch, self.batch * self.seq_len)
    }

    /// Group `g` of `requests` ([`Evaluator::choice_groups`]) as a pipeline sends it:
    /// the right-padded rows ([`crate::model::continuation_tokens`]) and each request's
    /// row.
    pub fn choice_batch(
        requests: &[crate::choice::Request],
        g: &[usize],
    ) -> (Batch, Vec<ChoiceRow>) {
        let pairs: Vec<(&[u32], &[u32])> = g
            .iter()
            .map(|&i| (&requests[i].input[..], &requests[i].targets[..]))
            .collect();
        let (tokens, seq) = crate::model::continuation_tokens(&pairs);
        let rows = g
            .iter()
            .map(|&i| ChoiceRow {
                input_len: requests[i].input.len(),
                targets: requests[i].targets.clone(),
            })
            .collect();
        let batch = Batch {
            tokens,
            seq,
            scored: 0,
        };
        (batch, rows)
    }

    /// A stage's input checked against this part: the batch's token ids, and hidden
    /// states exactly where this stage is not the first (one row of the model's width
    /// per token).
    fn stage_input(
        &self,
        batch: &Batch,
        hidden: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, EvalError> {
        let (part, h) = (&self.part, self.config.hidden);
        let vocab = self.config.vocab as u32;
        if let Some(t) = batch.tokens.iter().find(|&&t| t >= vocab) {
            return Err(EvalError::Request(format!(
                "token id {t} is outside the vocabulary ({vocab})"
            )));
        }
        Ok(match (part.first, hidden) {
            (true, None) => None,
            (false, Some(x)) if x.len() == batch.tokens.len() * h => Some(x),
            (false, Some(x)) => {
                return Err(EvalError::Request(format!(
                    "{} hidden values for {} tokens of width {h}",
                    x.len(),
                    batch.tokens.len()
                )))
            }
            (true, Some(_)) => {
                return Err(EvalError::Request(
                    "the first stage takes tokens, not hidden states".into(),
                ))
            }
            (false, None) => {
                return Err(EvalError::Request(
                    "this stage needs the previous stage's hidden states".into(),
                ))
            }
        })
    }

    /// The part of the model this process holds.
    pub fn part(&self) -> &Part {
        &self.part
    }

    /// Whether one batch per thread fits in [`PARALLEL_BATCH_BYTES`] of activations.
    fn batches_in_parallel(&self) -> bool {
        let c = self.config();
        let rows = self.batch * self.seq_len;
        let per_row = 8 * c.hidden.max(c.heads * c.head_dim)
            + 2 * c.intermediate
            + c.heads * self.seq_len / self.batch.max(1);
        let bytes = rows * per_row * 4;
        bytes * rayon::current_num_threads() <= PARALLEL_BATCH_BYTES
    }

    /// Merges with one weight vector and scores data set 0 (the objective).
    pub fn evaluate(&mut self, weights: &[f32]) -> Result<EvalResult, EvalError> {
        self.set_weights(weights)?;
        self.score(0)
    }

    /// Parameters of the model (elements of all tensors).
    pub fn parameters(&self) -> u64 {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.store.data.iter().map(|t| t.len() as u64).sum(),
            Backend::Gpu(m) => m.parameters,
        }
    }

    pub fn n_sources(&self) -> usize {
        self.n_sources
    }
}

/// Scores windows for [`Evaluator::score_race_with`]: given the evaluator and the next
/// windows (one per batch), their NLL sums in order.
pub type WindowRunner<'a> = dyn FnMut(&Evaluator, &[Batch]) -> Result<Vec<f64>, EvalError> + 'a;

/// Scores multiple-choice requests for [`Evaluator::score_race_with`] and
/// [`Evaluator::score_task_with`]: each request's log-likelihood and greedy flag, in order.
pub type ChoiceRunner<'a> = dyn FnMut(&mut Evaluator, &[crate::choice::Request]) -> Result<Vec<(f64, bool)>, EvalError>
    + 'a;

/// A raced objective's scores ([`Evaluator::score_race`]).
#[derive(Debug)]
pub struct Raced {
    /// Each objective set's result.
    pub sets: Vec<SetResult>,
    /// Every scored unit's value, set after set, each in scoring order: a window's NLL
    /// sum, an item's choice NLL.
    pub units: Vec<f64>,
    /// Where the race stopped the trial.
    pub partial: Option<ckmerge_common::race::Partial>,
    /// Scored whole after racing a leader: how it compares with the leader, paired on
    /// the leader's units.
    pub versus_leader: Option<ckmerge_common::race::Versus>,
}

/// One objective set in a race: its units, the tokens its mean divides by, and the
/// values scored so far.
struct Stratum {
    units: usize,
    tokens: usize,
    values: Vec<f64>,
    kind: StratumKind,
}

/// `flat` cut into one slice per set, `counts[d]` values for set `d`, where the counts
/// fit sets of `units` (one per set, none above its set's units, adding up to `flat`'s
/// length); None where they do not.
fn split_sets<'a>(flat: &'a [f64], counts: &[usize], units: &[usize]) -> Option<Vec<&'a [f64]>> {
    if counts.len() != units.len()
        || counts.iter().sum::<usize>() != flat.len()
        || counts.iter().zip(units).any(|(c, u)| c > u)
    {
        return None;
    }
    let mut at = 0;
    Some(
        counts
            .iter()
            .map(|&n| {
                at += n;
                &flat[at - n..at]
            })
            .collect(),
    )
}

impl Stratum {
    /// A task's scored items' choice results, items in scoring order, each item's
    /// choices in order ([`ckmerge_common::race::Partial::choices`]); none for a text.
    fn choices(&self) -> Vec<(f64, bool)> {
        match &self.kind {
            StratumKind::Task {
                order,
                requests,
                results,
            } => order[..self.values.len()]
                .iter()
                .flat_map(|&it| requests[it].iter().map(|&i| results[i]))
                .collect(),
            StratumKind::Text { .. } => Vec::new(),
        }
    }
}

/// The race's view of the strata: each set's values so far paired with `inc`'s (the
/// incumbent's or the leader's units of that set), as many as both have, with the set's
/// weight.
fn paired<'a>(
    strata: &'a [Stratum],
    inc: &[&'a [f64]],
    weights: &[f64],
) -> Vec<ckmerge_common::race::Stratum<'a>> {
    strata
        .iter()
        .zip(inc)
        .zip(weights)
        .map(|((s, &inc), &weight)| ckmerge_common::race::Stratum {
            cand: &s.values[..s.values.len().min(inc.len())],
            inc,
            units: s.units,
            tokens: s.tokens,
            weight,
        })
        .collect()
}

enum StratumKind {
    /// One window per batch, in the set's (shuffled) window order.
    Text { batches: Vec<Batch> },
    /// Items in race order, each item's request indices, and the results so far.
    Task {
        order: Vec<usize>,
        requests: Vec<Vec<usize>>,
        results: Vec<(f64, bool)>,
    },
}

/// Requests grouped for batched scoring: sorted by input length (longest first, so
/// padding is at most the length step between neighbours), at most `batch` per group and
/// at most `tokens` padded tokens (a window batch's activations).
fn length_batches(
    requests: &[crate::choice::Request],
    batch: usize,
    tokens: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].input.len()));
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match out.last_mut() {
            // The group's first is its longest: the padded length.
            Some(g)
                if g.len() < batch.max(1)
                    && (g.len() + 1) * requests[g[0]].input.len() <= tokens.max(1) =>
            {
                g.push(i)
            }
            _ => out.push(vec![i]),
        }
    }
    out
}

/// Name for a data set given as a list of paths: the first file's stem.
pub fn dataset_name(files: &[PathBuf]) -> String {
    files
        .first()
        .and_then(|p| Path::new(p).file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into())
}
