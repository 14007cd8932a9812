//! Causal language models on the CPU, in f32, reading like their transformers
//! counterparts (`modeling_llama.py`, `modeling_gpt_neox.py`): a config resolved once,
//! weights found by name prefix (`model.layers.{i}.self_attn`), one forward pass that
//! returns the summed negative log-likelihood of the scored tokens.
//!
//! Weights live in a [`ParamStore`] (one f32 buffer per checkpoint tensor, indexed), so
//! the evaluator can merge new weights into the same buffers between calls; a model only
//! holds indices into it.

pub mod config;

use std::collections::HashMap;

use ckmerge_kernels::ops::{self, HeadLayout};

pub use config::{Arch, ConfigError, ModelConfig};

/// One f32 buffer per tensor, with names and shapes.
pub struct ParamStore {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub data: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new(names: Vec<String>, shapes: Vec<Vec<usize>>) -> ParamStore {
        let data = shapes
            .iter()
            .map(|s| vec![0.0; s.iter().product()])
            .collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        ParamStore {
            names,
            shapes,
            data,
            index,
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}

/// Why a checkpoint's tensors do not fit its config.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("tensor `{0}` is missing; the checkpoint does not match its config.json")]
    Missing(String),
    #[error("tensor `{name}` has shape {got:?}; config.json implies {want:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
}

/// A tensor the forward pass reads: its index in the store.
type P = usize;

struct LlamaLayer {
    in_norm: P,
    post_norm: P,
    q: (P, Option<P>),
    k: (P, Option<P>),
    v: (P, Option<P>),
    o: (P, Option<P>),
    gate: (P, Option<P>),
    up: (P, Option<P>),
    down: (P, Option<P>),
}

struct NeoXLayer {
    ln1: (P, P),
    ln2: (P, P),
    qkv: (P, P),
    dense: (P, P),
    fc_in: (P, P),
    fc_out: (P, P),
}

enum Layers {
    Llama(Vec<LlamaLayer>),
    NeoX(Vec<NeoXLayer>),
}

/// The final norm before the output head.
enum FinalNorm {
    Rms(P),
    Layer(P, P),
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
        let prefix = match config.arch {
            Arch::Llama => "model.layers.",
            Arch::GptNeoX => "gpt_neox.layers.",
        };
        if let Some(rest) = name.strip_prefix(prefix) {
            if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                return self.layers.contains(&i);
            }
        }
        let embed = match config.arch {
            Arch::Llama => "model.embed_tokens.weight",
            Arch::GptNeoX => "gpt_neox.embed_in.weight",
        };
        if name == embed {
            return self.first || (self.last && config.tie_embeddings);
        }
        self.last
    }
}

/// A model: config plus where each weight is in the store.
pub struct Model {
    pub config: ModelConfig,
    pub part: Part,
    embed: Option<P>,
    /// Final norm and output head (the last part only).
    head: Option<(FinalNorm, P)>,
    layers: Layers,
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_seq: usize,
}

struct Lookup<'a> {
    store: &'a ParamStore,
}

impl Lookup<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<P, WeightError> {
        let i = self
            .store
            .index_of(name)
            .ok_or_else(|| WeightError::Missing(name.into()))?;
        if self.store.shapes[i] != shape {
            return Err(WeightError::Shape {
                name: name.into(),
                got: self.store.shapes[i].clone(),
                want: shape.to_vec(),
            });
        }
        Ok(i)
    }
    fn linear(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<(P, Option<P>), WeightError> {
        let w = self.get(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok((w, b))
    }
    fn linear_b(&self, prefix: &str, out: usize, inp: usize) -> Result<(P, P), WeightError> {
        let (w, b) = self.linear(prefix, out, inp, true)?;
        Ok((w, b.expect("bias requested")))
    }
    /// The input embedding (first part) and the output head (last part; the same tensor
    /// as the embedding when tied).
    fn embeddings(
        &self,
        c: &ModelConfig,
        first: bool,
        last: bool,
        embed: &str,
        head: &str,
    ) -> Result<(Option<P>, Option<P>), WeightError> {
        let e = if first || (last && c.tie_embeddings) {
            Some(self.get(embed, &[c.vocab, c.hidden])?)
        } else {
            None
        };
        let h = match (last, c.tie_embeddings) {
            (false, _) => None,
            (true, true) => e,
            (true, false) => Some(self.get(head, &[c.vocab, c.hidden])?),
        };
        Ok((e, h))
    }
    fn norm(&self, prefix: &str, h: usize) -> Result<(P, P), WeightError> {
        Ok((
            self.get(&format!("{prefix}.weight"), &[h])?,
            self.get(&format!("{prefix}.bias"), &[h])?,
        ))
    }
}

impl Model {
    /// Finds every weight the config implies in `store`, checking shapes. `max_seq` sizes
    /// the rotary tables.
    pub fn new(
        config: ModelConfig,
        store: &ParamStore,
        max_seq: usize,
    ) -> Result<Model, WeightError> {
        let part = Part::whole(&config);
        Model::new_part(config, store, max_seq, part)
    }

    /// A model holding only `part`: `store` needs only the tensors [`Part::needs`].
    pub fn new_part(
        config: ModelConfig,
        store: &ParamStore,
        max_seq: usize,
        part: Part,
    ) -> Result<Model, WeightError> {
        let c = &config;
        let l = Lookup { store };
        let (h, hd) = (c.hidden, c.head_dim);
        let (first, last) = (part.first, part.last);
        let (embed, head, layers) = match c.arch {
            Arch::Llama => {
                let (embed, lm_head) = l.embeddings(
                    c,
                    part.first,
                    part.last,
                    "model.embed_tokens.weight",
                    "lm_head.weight",
                )?;
                let mut layers = Vec::with_capacity(part.layers.len());
                for i in part.layers.clone() {
                    let p = format!("model.layers.{i}");
                    layers.push(LlamaLayer {
                        in_norm: l.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                        post_norm: l.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                        q: l.linear(
                            &format!("{p}.self_attn.q_proj"),
                            c.heads * hd,
                            h,
                            c.qkv_bias,
                        )?,
                        k: l.linear(
                            &format!("{p}.self_attn.k_proj"),
                            c.kv_heads * hd,
                            h,
                            c.qkv_bias,
                        )?,
                        v: l.linear(
                            &format!("{p}.self_attn.v_proj"),
                            c.kv_heads * hd,
                            h,
                            c.qkv_bias,
                        )?,
                        o: l.linear(&format!("{p}.self_attn.o_proj"), h, c.heads * hd, c.o_bias)?,
                        gate: l.linear(
                            &format!("{p}.mlp.gate_proj"),
                            c.intermediate,
                            h,
                            c.mlp_bias,
                        )?,
                        up: l.linear(&format!("{p}.mlp.up_proj"), c.intermediate, h, c.mlp_bias)?,
                        down: l.linear(
                            &format!("{p}.mlp.down_proj"),
                            h,
                            c.intermediate,
                            c.mlp_bias,
                        )?,
                    });
                }
                let head = match lm_head {
                    Some(p) if last => Some((FinalNorm::Rms(l.get("model.norm.weight", &[h])?), p)),
                    _ => None,
                };
                (embed.filter(|_| first), head, Layers::Llama(layers))
            }
            Arch::GptNeoX => {
                let (embed, lm_head) = l.embeddings(
                    c,
                    part.first,
                    part.last,
                    "gpt_neox.embed_in.weight",
                    "embed_out.weight",
                )?;
                let mut layers = Vec::with_capacity(part.layers.len());
                for i in part.layers.clone() {
                    let p = format!("gpt_neox.layers.{i}");
                    layers.push(NeoXLayer {
                        ln1: l.norm(&format!("{p}.input_layernorm"), h)?,
                        ln2: l.norm(&format!("{p}.post_attention_layernorm"), h)?,
                        qkv: l.linear_b(&format!("{p}.attention.query_key_value"), 3 * h, h)?,
                        dense: l.linear_b(&format!("{p}.attention.dense"), h, h)?,
                        fc_in: l.linear_b(&format!("{p}.mlp.dense_h_to_4h"), c.intermediate, h)?,
                        fc_out: l.linear_b(&format!("{p}.mlp.dense_4h_to_h"), h, c.intermediate)?,
                    });
                }
                let head = match lm_head {
                    Some(p) if last => {
                        let (w, b) = l.norm("gpt_neox.final_layer_norm", h)?;
                        Some((FinalNorm::Layer(w, b), p))
                    }
                    _ => None,
                };
                (embed.filter(|_| first), head, Layers::NeoX(layers))
            }
        };
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
    pub fn forward_layers(&self, w: &ParamStore, x: &mut [f32], seq: usize) {
        let c = &self.config;
        let h = c.hidden;
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
        let batch = rows / seq;
        let d = |p: P| w.data[p].as_slice();
        let mut normed = vec![0f32; rows * h];
        match &self.layers {
            Layers::Llama(layers) => {
                let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
                let mut q = vec![0f32; rows * qd];
                let mut k = vec![0f32; rows * kvd];
                let mut v = vec![0f32; rows * kvd];
                let mut att = vec![0f32; rows * qd];
                let mut gate = vec![0f32; rows * c.intermediate];
                let mut up = vec![0f32; rows * c.intermediate];
                let mut tmp = vec![0f32; rows * h];
                let lin =
                    |x: &[f32], k: usize, (wi, bi): (P, Option<P>), n: usize, out: &mut [f32]| {
                        ops::linear(x, rows, k, d(wi), n, bi.map(d), out)
                    };
                for layer in layers {
                    ops::rms_norm(x, d(layer.in_norm), c.norm_eps, &mut normed);
                    lin(&normed, h, layer.q, qd, &mut q);
                    lin(&normed, h, layer.k, kvd, &mut k);
                    lin(&normed, h, layer.v, kvd, &mut v);
                    ops::apply_rope(
                        &mut q, qd, 0, c.heads, c.head_dim, c.rot_dim, seq, &self.cos, &self.sin,
                    );
                    ops::apply_rope(
                        &mut k, kvd, 0, c.kv_heads, c.head_dim, c.rot_dim, seq, &self.cos,
                        &self.sin,
                    );
                    let ql = HeadLayout {
                        row_stride: qd,
                        head_stride: c.head_dim,
                    };
                    let kvl = HeadLayout {
                        row_stride: kvd,
                        head_stride: c.head_dim,
                    };
                    let scale = 1.0 / (c.head_dim as f32).sqrt();
                    ops::causal_attention(
                        &q, ql, &k, &v, kvl, &mut att, ql, batch, seq, c.heads, c.kv_heads,
                        c.head_dim, scale,
                    );
                    lin(&att, qd, layer.o, h, &mut tmp);
                    ops::add_in_place(x, &tmp);
                    ops::rms_norm(x, d(layer.post_norm), c.norm_eps, &mut normed);
                    lin(&normed, h, layer.gate, c.intermediate, &mut gate);
                    lin(&normed, h, layer.up, c.intermediate, &mut up);
                    match c.act {
                        ops::Activation::Silu => ops::silu_mul(&mut gate, &up),
                        act => {
                            ops::activate(&mut gate, act);
                            gate.iter_mut().zip(&up).for_each(|(g, u)| *g *= u);
                        }
                    }
                    lin(&gate, c.intermediate, layer.down, h, &mut tmp);
                    ops::add_in_place(x, &tmp);
                }
            }
            Layers::NeoX(layers) => {
                let hd = c.head_dim;
                let mut qkv = vec![0f32; rows * 3 * h];
                let mut att = vec![0f32; rows * h];
                let mut attn_out = vec![0f32; rows * h];
                let mut mid = vec![0f32; rows * c.intermediate];
                let mut mlp_out = vec![0f32; rows * h];
                let lin = |x: &[f32], k: usize, (wi, bi): (P, P), n: usize, out: &mut [f32]| {
                    ops::linear(x, rows, k, d(wi), n, Some(d(bi)), out)
                };
                for layer in layers {
                    ops::layer_norm(x, d(layer.ln1.0), d(layer.ln1.1), c.norm_eps, &mut normed);
                    lin(&normed, h, layer.qkv, 3 * h, &mut qkv);
                    // Per head the fused projection holds [q | k | v], each head_dim wide.
                    let l = HeadLayout {
                        row_stride: 3 * h,
                        head_stride: 3 * hd,
                    };
                    rope_neox(&mut qkv, c, seq, &self.cos, &self.sin);
                    let (qs, ks, vs) = (&qkv[..], &qkv[hd..], &qkv[2 * hd..]);
                    let ol = HeadLayout {
                        row_stride: h,
                        head_stride: hd,
                    };
                    let scale = 1.0 / (hd as f32).sqrt();
                    ops::causal_attention(
                        qs, l, ks, vs, l, &mut att, ol, batch, seq, c.heads, c.heads, hd, scale,
                    );
                    lin(&att, h, layer.dense, h, &mut attn_out);
                    if c.parallel_residual {
                        ops::layer_norm(x, d(layer.ln2.0), d(layer.ln2.1), c.norm_eps, &mut normed);
                    } else {
                        ops::add_in_place(x, &attn_out);
                        ops::layer_norm(x, d(layer.ln2.0), d(layer.ln2.1), c.norm_eps, &mut normed);
                    }
                    lin(&normed, h, layer.fc_in, c.intermediate, &mut mid);
                    ops::activate(&mut mid, c.act);
                    lin(&mid, c.intermediate, layer.fc_out, h, &mut mlp_out);
                    if c.parallel_residual {
                        ops::add_in_place(x, &attn_out);
                    }
                    ops::add_in_place(x, &mlp_out);
                }
            }
        }
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
        let d = |p: P| w.data[p].as_slice();
        let (norm, lm_head) = self
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
        match norm {
            FinalNorm::Rms(p) => ops::rms_norm(&picked, d(*p), c.norm_eps, &mut normed),
            FinalNorm::Layer(wn, bn) => {
                ops::layer_norm(&picked, d(*wn), d(*bn), c.norm_eps, &mut normed)
            }
        }
        const SLAB: usize = 256;
        let mut logits = vec![0f32; SLAB.min(targets.len()) * c.vocab];
        let mut total = 0.0f64;
        for (i, tg) in targets.chunks(SLAB).enumerate() {
            let m = tg.len();
            let xs = &normed[i * SLAB * h..(i * SLAB + m) * h];
            let out = &mut logits[..m * c.vocab];
            ops::linear(xs, m, h, d(*lm_head), c.vocab, None, out);
            total += ops::nll_sum(out, c.vocab, tg);
        }
        total
    }
}

/// Partial rotary on the q and k parts of NeoX's fused projection, in place: per head the
/// row holds `[q | k | v]`, so q of head `j` starts at `j * 3 * head_dim` and k `head_dim`
/// later.
fn rope_neox(qkv: &mut [f32], c: &ModelConfig, seq: usize, cos: &[f32], sin: &[f32]) {
    let (h, hd) = (c.hidden, c.head_dim);
    for offset in [0, hd] {
        ops::apply_rope(
            qkv,
            3 * h,
            offset,
            c.heads,
            3 * hd,
            c.rot_dim,
            seq,
            cos,
            sin,
        );
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
