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
    Llama {
        layers: Vec<LlamaLayer>,
        norm: P,
    },
    NeoX {
        layers: Vec<NeoXLayer>,
        norm: (P, P),
    },
}

/// A model: config plus where each weight is in the store.
pub struct Model {
    pub config: ModelConfig,
    embed: P,
    lm_head: P,
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
    /// The input embedding and the output head (the same tensor when tied).
    fn embeddings(&self, c: &ModelConfig, embed: &str, head: &str) -> Result<(P, P), WeightError> {
        let e = self.get(embed, &[c.vocab, c.hidden])?;
        let h = if c.tie_embeddings {
            e
        } else {
            self.get(head, &[c.vocab, c.hidden])?
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
        let c = &config;
        let l = Lookup { store };
        let (h, hd) = (c.hidden, c.head_dim);
        let (embed, lm_head, layers) = match c.arch {
            Arch::Llama => {
                let (embed, lm_head) =
                    l.embeddings(c, "model.embed_tokens.weight", "lm_head.weight")?;
                let mut layers = Vec::with_capacity(c.layers);
                for i in 0..c.layers {
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
                let norm = l.get("model.norm.weight", &[h])?;
                (embed, lm_head, Layers::Llama { layers, norm })
            }
            Arch::GptNeoX => {
                let (embed, lm_head) =
                    l.embeddings(c, "gpt_neox.embed_in.weight", "embed_out.weight")?;
                let mut layers = Vec::with_capacity(c.layers);
                for i in 0..c.layers {
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
                let norm = l.norm("gpt_neox.final_layer_norm", h)?;
                (embed, lm_head, Layers::NeoX { layers, norm })
            }
        };
        let (cos, sin) = ops::rope_tables(&config.inv_freq(), max_seq);
        Ok(Model {
            config,
            embed,
            lm_head,
            layers,
            cos,
            sin,
            max_seq,
        })
    }

    /// Summed negative log-likelihood (f64) of `batch` windows of `seq` tokens each,
    /// laid end to end in `tokens`. In each window, the last `scored` positions are
    /// scored: position `t` predicts token `t + 1`, so at most `seq - 1` per window.
    pub fn nll(&self, w: &ParamStore, tokens: &[u32], seq: usize, scored: usize) -> f64 {
        let c = &self.config;
        let rows = tokens.len();
        assert!(
            seq >= 2 && rows.is_multiple_of(seq) && scored < seq,
            "bad window shape"
        );
        assert!(
            seq <= self.max_seq,
            "window of {seq} tokens is longer than the {} the model was set up for",
            self.max_seq
        );
        let batch = rows / seq;
        let h = c.hidden;
        let d = |p: P| w.data[p].as_slice();

        // Embedding lookup.
        let emb = d(self.embed);
        let mut x = vec![0f32; rows * h];
        for (r, &t) in tokens.iter().enumerate() {
            x[r * h..(r + 1) * h].copy_from_slice(&emb[t as usize * h..(t as usize + 1) * h]);
        }
        let mut normed = vec![0f32; rows * h];
        match &self.layers {
            Layers::Llama { layers, norm } => {
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
                    ops::rms_norm(&x, d(layer.in_norm), c.norm_eps, &mut normed);
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
                    ops::add_in_place(&mut x, &tmp);
                    ops::rms_norm(&x, d(layer.post_norm), c.norm_eps, &mut normed);
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
                    ops::add_in_place(&mut x, &tmp);
                }
                ops::rms_norm(&x, d(*norm), c.norm_eps, &mut normed);
            }
            Layers::NeoX { layers, norm } => {
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
                    ops::layer_norm(&x, d(layer.ln1.0), d(layer.ln1.1), c.norm_eps, &mut normed);
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
                        ops::layer_norm(
                            &x,
                            d(layer.ln2.0),
                            d(layer.ln2.1),
                            c.norm_eps,
                            &mut normed,
                        );
                    } else {
                        ops::add_in_place(&mut x, &attn_out);
                        ops::layer_norm(
                            &x,
                            d(layer.ln2.0),
                            d(layer.ln2.1),
                            c.norm_eps,
                            &mut normed,
                        );
                    }
                    lin(&normed, h, layer.fc_in, c.intermediate, &mut mid);
                    ops::activate(&mut mid, c.act);
                    lin(&mid, c.intermediate, layer.fc_out, h, &mut mlp_out);
                    if c.parallel_residual {
                        ops::add_in_place(&mut x, &attn_out);
                    }
                    ops::add_in_place(&mut x, &mlp_out);
                }
                ops::layer_norm(&x, d(norm.0), d(norm.1), c.norm_eps, &mut normed);
            }
        }

        // Logits only for scored positions, a slab of rows at a time, so memory for the
        // vocabulary projection stays bounded.
        let mut picked = Vec::with_capacity(batch * scored * h);
        let mut targets = Vec::with_capacity(batch * scored);
        for b in 0..batch {
            for t in seq - 1 - scored..seq - 1 {
                let r = b * seq + t;
                picked.extend_from_slice(&normed[r * h..(r + 1) * h]);
                targets.push(tokens[r + 1]);
            }
        }
        const SLAB: usize = 256;
        let mut logits = vec![0f32; SLAB.min(targets.len()) * c.vocab];
        let mut total = 0.0f64;
        for (i, tg) in targets.chunks(SLAB).enumerate() {
            let m = tg.len();
            let xs = &picked[i * SLAB * h..(i * SLAB + m) * h];
            let out = &mut logits[..m * c.vocab];
            ops::linear(xs, m, h, d(self.lm_head), c.vocab, None, out);
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
