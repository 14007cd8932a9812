//! The Llama family (`LlamaForCausalLM`, and the config-compatible Mistral, Qwen2 and
//! Qwen3): pre-norm decoder layers with RMSNorm, rotary attention with grouped-query
//! heads, and a gated MLP, as in transformers' `modeling_llama.py`
//! (`LlamaDecoderLayer.forward`). Qwen3 adds an RMSNorm over each query and key head
//! before the rotary embedding (`modeling_qwen3.py`, `Qwen3Attention.forward`); OLMo
//! (`modeling_olmo.py`) replaces every RMSNorm by a LayerNorm without parameters and
//! clamps q, k and v to `clip_qkv` right after their projections; SmolLM3
//! (`modeling_smollm3.py`) leaves the rotary embedding out on the layers its
//! `no_rope_layers` marks 0.
//! Tensor names are spelled here and nowhere else.

use super::backend::{Backend, GatedMlp, Heads, Linear, Norm, Qkv, TensorLookup, WeightError};
use super::config::{ModelConfig, QkNorm};
use super::Names;

pub const NAMES: Names = Names {
    layers: "model.layers",
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm",
    lm_head: "lm_head.weight",
    norm_bias: false,
};

/// One decoder layer's tensors.
pub struct Layer<T> {
    in_norm: Norm<T>,
    post_norm: Norm<T>,
    q: Linear<T>,
    k: Linear<T>,
    v: Linear<T>,
    o: Linear<T>,
    mlp: GatedMlp<T>,
    /// Whether the attention rotates q and k (SmolLM3 skips it on every fourth layer).
    rope: bool,
    /// Qwen3's `self_attn.q_norm` and `k_norm` and the width each normalises over
    /// (`head_dim` for Qwen3).
    qk_norm: Option<(Norm<T>, Norm<T>, usize, usize)>,
}

impl<T: Copy> Layer<T> {
    /// Layer `i`'s tensors, with the shapes `c` implies.
    pub fn load<L: TensorLookup<Tensor = T>>(
        l: &L,
        c: &ModelConfig,
        i: usize,
    ) -> Result<Layer<T>, WeightError> {
        let p = NAMES.layer(i);
        let (h, qd, kvd) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        Ok(Layer {
            in_norm: match c.plain_norms {
                true => Norm::plain(),
                false => l.norm(&format!("{p}.input_layernorm"), h, false)?,
            },
            post_norm: match c.plain_norms {
                true => Norm::plain(),
                false => l.norm(&format!("{p}.post_attention_layernorm"), h, false)?,
            },
            q: l.linear(&format!("{p}.self_attn.q_proj"), qd, h, c.qkv_bias)?,
            k: l.linear(&format!("{p}.self_attn.k_proj"), kvd, h, c.qkv_bias)?,
            v: l.linear(&format!("{p}.self_attn.v_proj"), kvd, h, c.qkv_bias)?,
            o: l.linear(&format!("{p}.self_attn.o_proj"), h, qd, c.o_bias)?,
            mlp: GatedMlp::load(l, c, &format!("{p}.mlp"))?,
            rope: c.rope_layers.as_ref().is_none_or(|r| r[i]),
            qk_norm: match c.qk_norm {
                None => None,
                Some(kind) => {
                    let (qw, kw) = match kind {
                        QkNorm::PerHead => (c.head_dim, c.head_dim),
                        QkNorm::Whole => (qd, kvd),
                    };
                    Some((
                        l.norm(&format!("{p}.self_attn.q_norm"), qw, false)?,
                        l.norm(&format!("{p}.self_attn.k_norm"), kw, false)?,
                        qw,
                        kw,
                    ))
                }
            },
        })
    }
}

/// Runs `layers` over the residual stream `x` (`rows` rows, windows of `seq`) in place.
pub fn forward<B: Backend>(
    b: &B,
    layers: &[Layer<B::Tensor>],
    x: &mut B::Rows,
    rows: usize,
    seq: usize,
) -> Result<(), B::Error> {
    let c = b.config();
    let (h, hd) = (c.hidden, c.head_dim);
    let (qd, kvd) = (c.heads * hd, c.kv_heads * hd);
    let mut normed = b.input(rows * h)?;
    let (mut q, mut k, mut v) = (b.rows(rows * qd)?, b.rows(rows * kvd)?, b.rows(rows * kvd)?);
    let mut att = b.input(rows * qd)?;
    let (mut gate, mut up) = (
        b.rows(rows * c.intermediate)?,
        b.rows(rows * c.intermediate)?,
    );
    let (q_heads, kv_heads) = Heads::separate(c);
    for l in layers {
        b.norm(x, &l.in_norm, &mut normed, rows)?;
        b.linear(&normed, &l.q, &mut q, rows)?;
        b.linear(&normed, &l.k, &mut k, rows)?;
        b.linear(&normed, &l.v, &mut v, rows)?;
        if let Some(clip) = c.clip_qkv {
            b.clamp(&mut q, clip)?;
            b.clamp(&mut k, clip)?;
            b.clamp(&mut v, clip)?;
        }
        if let Some((qn, kn, qw, kw)) = &l.qk_norm {
            b.group_norm(&mut q, qn, *qw, rows)?;
            b.group_norm(&mut k, kn, *kw, rows)?;
        }
        let qkv = Qkv::Separate {
            q: &mut q,
            k: &mut k,
            v: &v,
        };
        b.attention(
            qkv,
            [q_heads, kv_heads, kv_heads],
            l.rope,
            &mut att,
            rows,
            seq,
        )?;
        b.linear_add(&att, &l.o, x, rows)?;
        b.norm(x, &l.post_norm, &mut normed, rows)?;
        l.mlp.add(b, &normed, (&mut gate, &mut up), x, rows)?;
    }
    Ok(())
}
