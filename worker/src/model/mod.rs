//! Causal language models, one module per architecture (`llama`, `neox`), each reading
//! like its transformers counterpart: a config resolved once ([`config`]), tensor names
//! spelled once in the architecture's module, one decoder layer written once over the
//! [`backend::Backend`] operations that the CPU reference ([`cpu`]) and the GPU
//! (`crate::gpu`) implement. This module holds what every architecture shares: which
//! part of the model a process holds ([`Part`]), the architectures' layer tables
//! ([`Layers`]), and the CPU model ([`Model`]).
//!
//! Adding an architecture: a module like `llama.rs` (its [`Names`], its layer's tensors,
//! its `forward`), a variant of [`config::Arch`] and of [`Layers`], and its config fields
//! in `config.rs`; both backends then run it.

pub mod backend;
pub mod baichuan;
pub mod config;
pub mod cpu;
pub mod llama;
pub mod neox;
pub mod olmo2;

use std::convert::Infallible;

use ckmerge_kernels::ops;

pub use backend::{Backend, Head, Norm, TensorLookup, WeightError};
pub use config::{Arch, ConfigError, ModelConfig};
pub use cpu::ParamStore;

/// Where an architecture keeps its tensors, by Hugging Face name.
pub struct Names {
    /// Decoder layer `i`'s tensors are `{layers}.{i}.…`.
    pub layers: &'static str,
    pub embed: &'static str,
    /// Prefix of the final norm's tensors.
    pub final_norm: &'static str,
    /// The output head when the embeddings are not tied.
    pub lm_head: &'static str,
    /// Norms are LayerNorms with a bias (else RMSNorms).
    pub norm_bias: bool,
}

impl Names {
    /// The prefix of layer `i`'s tensors.
    pub fn layer(&self, i: usize) -> String {
        format!("{}.{i}", self.layers)
    }

    /// The decoder layer tensor `name` belongs to, if any (`layers.1` is not layer 10).
    pub fn layer_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix(self.layers)?
            .strip_prefix('.')?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    /// The final norm and the output head (the embedding when tied).
    pub fn head<L: TensorLookup>(
        &self,
        l: &L,
        c: &ModelConfig,
    ) -> Result<Head<L::Tensor>, WeightError> {
        let lm_head = if c.tie_embeddings {
            self.embed
        } else {
            self.lm_head
        };
        Ok(Head {
            norm: if c.plain_norms {
                Norm::plain()
            } else {
                l.norm(self.final_norm, c.hidden, self.norm_bias)?
            },
            lm_head: l.get(lm_head, &[c.vocab, c.hidden])?,
        })
    }

    /// The input embedding.
    pub fn embedding<L: TensorLookup>(
        &self,
        l: &L,
        c: &ModelConfig,
    ) -> Result<L::Tensor, WeightError> {
        l.get(self.embed, &[c.vocab, c.hidden])
    }
}

impl Arch {
    /// Where this architecture keeps its tensors.
    pub fn names(self) -> &'static Names {
        match self {
            Arch::Llama => &llama::NAMES,
            Arch::GptNeoX => &neox::NAMES,
            Arch::Olmo2 => &olmo2::NAMES,
            Arch::Baichuan => &baichuan::NAMES,
        }
    }
}

/// The decoder layers a process holds, as tensor handles of one backend.
pub enum Layers<T> {
    Llama(Vec<llama::Layer<T>>),
    NeoX(Vec<neox::Layer<T>>),
    Olmo2(Vec<olmo2::Layer<T>>),
    Baichuan(Vec<baichuan::Layer<T>>),
}

impl<T: Copy> Layers<T> {
    /// Finds the tensors of layers `part.layers` through `l`, checking their shapes.
    pub fn load<L: TensorLookup<Tensor = T>>(
        l: &L,
        c: &ModelConfig,
        layers: std::ops::Range<usize>,
    ) -> Result<Layers<T>, WeightError> {
        Ok(match c.arch {
            Arch::Llama => Layers::Llama(
                layers
                    .map(|i| llama::Layer::load(l, c, i))
                    .collect::<Result<_, _>>()?,
            ),
            Arch::GptNeoX => Layers::NeoX(
                layers
                    .map(|i| neox::Layer::load(l, c, i))
                    .collect::<Result<_, _>>()?,
            ),
            Arch::Olmo2 => Layers::Olmo2(
                layers
                    .map(|i| olmo2::Layer::load(l, c, i))
                    .collect::<Result<_, _>>()?,
            ),
            Arch::Baichuan => Layers::Baichuan(
                layers
                    .map(|i| baichuan::Layer::load(l, c, i))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Runs the layers over the residual stream `x` (`rows` rows, windows of `seq`).
    pub fn forward<B: Backend<Tensor = T>>(
        &self,
        b: &B,
        x: &mut B::Rows,
        rows: usize,
        seq: usize,
    ) -> Result<(), B::Error> {
        match self {
            Layers::Llama(l) => llama::forward(b, l, x, rows, seq),
            Layers::NeoX(l) => neox::forward(b, l, x, rows, seq),
            Layers::Olmo2(l) => olmo2::forward(b, l, x, rows, seq),
            Layers::Baichuan(l) => baichuan::forward(b, l, x, rows, seq),
        }
    }
}

/// What a pipeline stage passes on: hidden states to the next stage, or, from the last,
/// the batch's summed NLL (text windows) or its rows' continuation log-likelihoods
/// (multiple choice).
pub enum StageOutput {
    Hidden(Vec<f32>),
    Nll(f64),
    LogProbs(Vec<(f64, bool)>),
}

/// Continuation requests `(input, targets)` as one batch: each input right-padded to
/// the longest (exact: attention is causal, and the padding comes after every position
/// that is read), and that length.
pub fn continuation_tokens(rows: &[(&[u32], &[u32])]) -> (Vec<u32>, usize) {
    let len = rows.iter().map(|(i, _)| i.len()).max().unwrap_or(0);
    let mut tokens = Vec::with_capacity(rows.len() * len);
    for (input, targets) in rows {
        let (n, m) = (input.len(), targets.len());
        assert!(m >= 1 && m <= n, "bad continuation request");
        tokens.extend_from_slice(input);
        // Any valid id: its position is after every one that is read.
        tokens.resize(tokens.len() + len - n, input[n - 1]);
    }
    (tokens, len)
}

/// Which part of the model a process holds: a contiguous range of decoder layers, plus
/// the embedding on the first part and the final norm and output head on the last. The
/// whole model is one part holding everything; a pipeline stage holds one slice.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    pub layers: std::ops::Range<usize>,
    pub first: bool,
    pub last: bool,
}

impl Part {
    pub fn whole(config: &ModelConfig) -> Part {
        Part {
            layers: 0..config.layers,
            first: true,
            last: true,
        }
    }

    /// Stage `index` of `count`: layers split into contiguous ranges as even as possible
    /// (earlier stages take the remainder; the last also holds the output head).
    pub fn stage(config: &ModelConfig, index: usize, count: usize) -> Part {
        let (n, k) = (config.layers, count.max(1));
        let start = index * (n / k) + index.min(n % k);
        let len = n / k + usize::from(index < n % k);
        Part {
            layers: start..start + len,
            first: index == 0,
            last: index + 1 == k,
        }
    }

    /// Whether this part reads checkpoint tensor `name`: its layers' tensors, the
    /// embedding on the first part (and on the last when tied to the head), everything
    /// outside the layers (final norm, head) on the last.
    pub fn needs(&self, config: &ModelConfig, name: &str) -> bool {
        let names = config.arch.names();
        if let Some(i) = names.layer_of(name) {
            return self.layers.contains(&i);
        }
        if name == names.embed {
            return self.first || (self.last && config.tie_embeddings);
        }
        self.last
    }
}

/// A model on the CPU: config plus where each weight is in the store.
pub struct Model {
    pub config: ModelConfig,
    pub part: Part,
    embed: Option<usize>,
    /// Final norm and output head (the last part only).
    head: Option<Head<usize>>,
    layers: Layers<usize>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_seq: usize,
}

fn infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => match e {},
    }
}

impl Model {
    /// A model holding only `part`: `store` needs only the tensors [`Part::needs`], and
    /// every one the config implies, with its shape. `max_seq` sizes the rotary tables.
    pub fn new_part(
        config: ModelConfig,
        store: &ParamStore,
        max_seq: usize,
        part: Part,
    ) -> Result<Model, WeightError> {
        let names = config.arch.names();
        let embed = if part.first {
            Some(names.embedding(store, &config)?)
        } else {
            None
        };
        let head = if part.last {
            Some(names.head(store, &config)?)
        } else {
            None
        };
        let layers = Layers::load(store, &config, part.layers.clone())?;
        let (cos, sin) = ops::rope_tables(&config.inv_freq(), max_seq);
        Ok(Model {
            config,
            part,
            embed,
            head,
            layers,
            cos,
            sin,
            max_seq,
        })
    }

    /// Summed negative log-likelihood (f64) of `batch` windows of `seq` tokens each,
    /// laid end to end in `tokens`. In each window, the last `scored` positions are
    /// scored: position `t` predicts token `t + 1`, so at most `seq - 1` per window.
    /// Needs the whole model (see [`Part::whole`]).
    pub fn nll(&self, w: &ParamStore, tokens: &[u32], seq: usize, scored: usize) -> f64 {
        let mut x = self.embed(w, tokens);
        self.forward_layers(w, &mut x, seq);
        self.head_nll(w, &x, tokens, seq, scored)
    }

    /// Hidden states `[tokens.len(), hidden]` after the embedding (first part only).
    pub fn embed(&self, w: &ParamStore, tokens: &[u32]) -> Vec<f32> {
        let h = self.config.hidden;
        let emb = w.data[self.embed.expect("embed on a part without the embedding")].as_slice();
        let mut x = vec![0f32; tokens.len() * h];
        for (r, &t) in tokens.iter().enumerate() {
            x[r * h..(r + 1) * h].copy_from_slice(&emb[t as usize * h..(t as usize + 1) * h]);
        }
        x
    }

    /// Runs this part's decoder layers over hidden states `x` (`batch * seq` rows) in
    /// place. Pipeline stages call this on their slice; the hidden states they pass on
    /// are exactly what the next layer of a whole model would see.
    pub fn forward_layers(&self, w: &ParamStore, x: &mut Vec<f32>, seq: usize) {
        let h = self.config.hidden;
        let rows = x.len() / h;
        assert!(
            seq >= 2 && rows.is_multiple_of(seq) && x.len() == rows * h,
            "bad window shape"
        );
        assert!(
            seq <= self.max_seq,
            "window of {seq} tokens is longer than the {} the model was set up for",
            self.max_seq
        );
        let cpu = cpu::Cpu::new(&self.config, w, &self.cos, &self.sin);
        infallible(self.layers.forward(&cpu, x, rows, seq));
    }

    /// Summed NLL of the scored positions from the last layer's hidden states `x`
    /// (last part only); `tokens` are the windows' tokens, for the targets.
    pub fn head_nll(
        &self,
        w: &ParamStore,
        x: &[f32],
        tokens: &[u32],
        seq: usize,
        scored: usize,
    ) -> f64 {
        let c = &self.config;
        let h = c.hidden;
        let rows = tokens.len();
        assert!(
            seq >= 2 && rows.is_multiple_of(seq) && scored < seq && x.len() == rows * h,
            "bad window shape"
        );
        let batch = rows / seq;
        let head = self
            .head
            .as_ref()
            .expect("head_nll on a part without the output head");
        // Only scored rows are normalised and projected (row-wise ops, so the same
        // numbers as normalising every row), a slab at a time so memory for the
        // vocabulary projection stays bounded.
        let mut picked = Vec::with_capacity(batch * scored * h);
        let mut targets = Vec::with_capacity(batch * scored);
        for b in 0..batch {
            for t in seq - 1 - scored..seq - 1 {
                let r = b * seq + t;
                picked.extend_from_slice(&x[r * h..(r + 1) * h]);
                targets.push(tokens[r + 1]);
            }
        }
        let mut normed = vec![0f32; picked.len()];
        let cpu = cpu::Cpu::new(c, w, &self.cos, &self.sin);
        infallible(cpu.norm(&picked, &head.norm, &mut normed, targets.len()));
        const SLAB: usize = 256;
        let mut logits = vec![0f32; SLAB.min(targets.len()) * c.vocab];
        let row_scale = self.norm_head_scale(w);
        let mut total = 0.0f64;
        for (i, tg) in targets.chunks(SLAB).enumerate() {
            let m = tg.len();
            let xs = &normed[i * SLAB * h..(i * SLAB + m) * h];
            let out = &mut logits[..m * c.vocab];
            self.project(w, xs, m, row_scale.as_deref(), out);
            total += ops::nll_sum(out, c.vocab, tg);
        }
        total
    }
}

impl Model {
    /// Logits `[m, vocab]` of `m` normed hidden rows: the output head, times the
    /// NormHead's row scale where the model has one (see [`Model::norm_head_scale`]).
    fn project(
        &self,
        w: &ParamStore,
        normed: &[f32],
        m: usize,
        scale: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let head = self.head.as_ref().expect("a part with the output head");
        ops::linear(
            normed,
            m,
            c.hidden,
            &w.data[head.lm_head],
            c.vocab,
            None,
            out,
        );
        if let Some(scale) = scale {
            for row in out.chunks_mut(c.vocab) {
                row.iter_mut().zip(scale).for_each(|(v, s)| *v *= s);
            }
        }
    }

    /// Baichuan 2's NormHead: each row of the head divided by its L2 norm (as
    /// `nn.functional.normalize`, eps 1e-12), applied to the logits it produces. A pass
    /// over the whole head: compute it once per set of weights, not per request.
    pub fn norm_head_scale(&self, w: &ParamStore) -> Option<Vec<f32>> {
        let head = self.head.as_ref()?;
        self.config.norm_head.then(|| {
            w.data[head.lm_head]
                .chunks(self.config.hidden)
                .map(|r| {
                    let n = r
                        .iter()
                        .map(|&v| (v as f64) * (v as f64))
                        .sum::<f64>()
                        .sqrt();
                    (1.0 / n.max(1e-12)) as f32
                })
                .collect()
        })
    }

    /// Makes the model able to run `len` positions (its rotary tables), for
    /// multiple-choice requests longer than the evaluation windows.
    pub fn ensure_max_seq(&mut self, len: usize) {
        if len > self.max_seq {
            let (cos, sin) = ops::rope_tables(&self.config.inv_freq(), len);
            (self.cos, self.sin, self.max_seq) = (cos, sin, len);
        }
    }

    /// The log-likelihood (f64) of `targets` as the continuation of `input`: the last
    /// `targets.len()` positions of `input` predict them in order (lm-evaluation-harness's
    /// request: `input` is context + continuation without its last token), and whether
    /// each target is the argmax of its row (the first maximum on ties). `scale`:
    /// [`Model::norm_head_scale`] of these weights. Whole model only.
    pub fn continuation_logprob(
        &self,
        w: &ParamStore,
        input: &[u32],
        targets: &[u32],
        scale: Option<&[f32]>,
    ) -> (f64, bool) {
        self.continuation_logprobs(w, &[(input, targets)], scale)[0]
    }

    /// [`Model::continuation_logprob`] of several requests in one forward pass: each
    /// input right-padded to the longest. Exact, not an approximation: attention is
    /// causal, so positions after a sequence's last token (the padding) change nothing
    /// before it, and every position keeps its index (RoPE, ALiBi).
    pub fn continuation_logprobs(
        &self,
        w: &ParamStore,
        rows: &[(&[u32], &[u32])],
        scale: Option<&[f32]>,
    ) -> Vec<(f64, bool)> {
        let (tokens, len) = continuation_tokens(rows);
        let mut x = self.embed(w, &tokens);
        self.forward_layers(w, &mut x, len);
        let rows: Vec<(usize, &[u32])> = rows.iter().map(|(i, t)| (i.len(), *t)).collect();
        self.continuation_head(w, &x, len, &rows, scale)
    }

    /// The output head's part of [`Model::continuation_logprobs`], on the last layer's
    /// hidden states `x` of right-padded rows of `len` tokens ([`continuation_tokens`]),
    /// each row given as (its input's length, its targets): on a whole model, or on the
    /// last stage of a pipeline.
    pub fn continuation_head(
        &self,
        w: &ParamStore,
        x: &[f32],
        len: usize,
        rows: &[(usize, &[u32])],
        scale: Option<&[f32]>,
    ) -> Vec<(f64, bool)> {
        let c = &self.config;
        let h = c.hidden;
        let head = self
            .head
            .as_ref()
            .expect("continuation_logprob on a part without the output head");
        // The positions that predict each row's targets, all rows in one projection.
        let m_all: usize = rows.iter().map(|(_, t)| t.len()).sum();
        let mut picked = Vec::with_capacity(m_all * h);
        for (r, &(n, targets)) in rows.iter().enumerate() {
            let m = targets.len();
            picked.extend_from_slice(&x[(r * len + n - m) * h..(r * len + n) * h]);
        }
        let mut normed = vec![0f32; picked.len()];
        let cpu = cpu::Cpu::new(c, w, &self.cos, &self.sin);
        infallible(cpu.norm(&picked, &head.norm, &mut normed, m_all));
        let mut logits = vec![0f32; m_all * c.vocab];
        self.project(w, &normed, m_all, scale, &mut logits);
        let mut out = Vec::with_capacity(rows.len());
        let mut at = logits.chunks(c.vocab);
        for (_, targets) in rows {
            let (mut ll, mut greedy) = (0.0f64, true);
            for (row, &t) in at.by_ref().take(targets.len()).zip(targets.iter()) {
                let (lp, top) = ops::target_logprob(row, t);
                ll += lp;
                greedy &= top;
            }
            out.push((ll, greedy));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(layers: usize, tied: bool) -> ModelConfig {
        let text = format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
                "num_hidden_layers": {layers}, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128,
                "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": {tied}}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        ModelConfig::from_json(v.as_object().unwrap(), std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn baichuan_13b_uses_alibi_and_the_7b_rope() {
        let cfg = |hidden: usize| {
            let text = format!(
                r#"{{"architectures": ["BaichuanForCausalLM"], "hidden_size": {hidden},
                    "intermediate_size": 13696, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "vocab_size": 125696, "rms_norm_eps": 1e-6}}"#
            );
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            ModelConfig::from_json(v.as_object().unwrap(), std::path::Path::new("config.json"))
        };
        // Baichuan2-13B's shape: ALiBi, with its slopes for 40 heads (the first 32 a
        // geometric series from 2^-0.25, then every other one of 80's).
        let c = cfg(5120).unwrap();
        let s = c.alibi.as_ref().expect("the 13B uses ALiBi");
        assert_eq!(s.len(), 40);
        assert!((s[0] - 2f32.powf(-0.25)).abs() < 1e-7 && (s[31] - 2f32.powi(-8)).abs() < 1e-9);
        assert!((s[32] - 2f32.powf(-0.125)).abs() < 1e-7);
        let c = cfg(4096).unwrap();
        assert!(c.arch == Arch::Baichuan && c.norm_head && c.alibi.is_none());
    }

    #[test]
    fn stages_split_layers_into_contiguous_even_ranges() {
        let c = llama(10, false);
        let parts: Vec<Part> = (0..4).map(|i| Part::stage(&c, i, 4)).collect();
        let ranges: Vec<_> = parts.iter().map(|p| p.layers.clone()).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..8, 8..10]);
        assert!(parts[0].first && !parts[0].last);
        assert!(!parts[1].first && !parts[1].last);
        assert!(parts[3].last && !parts[3].first);
        assert_eq!(Part::stage(&c, 0, 1), Part::whole(&c));
    }

    #[test]
    fn each_tensor_belongs_to_the_stages_that_read_it() {
        for tied in [false, true] {
            let c = llama(4, tied);
            let (s0, s1) = (Part::stage(&c, 0, 2), Part::stage(&c, 1, 2));
            let holders = |n: &str| (s0.needs(&c, n), s1.needs(&c, n));
            assert_eq!(holders("model.layers.1.mlp.up_proj.weight"), (true, false));
            assert_eq!(
                holders("model.layers.2.self_attn.q_proj.weight"),
                (false, true)
            );
            assert_eq!(holders("model.norm.weight"), (false, true));
            assert_eq!(holders("lm_head.weight"), (false, true));
            // A tied embedding is also the last stage's output head.
            assert_eq!(holders("model.embed_tokens.weight"), (true, tied));
        }
        // "layers.1" must not match layer 10 and up by prefix.
        let c = llama(12, false);
        let p = Part::stage(&c, 0, 6);
        assert_eq!(p.layers, 0..2);
        assert!(p.needs(&c, "model.layers.1.mlp.up_proj.weight"));
        assert!(!p.needs(&c, "model.layers.10.mlp.up_proj.weight"));
    }
}
