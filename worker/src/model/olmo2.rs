//! OLMo 2 (`Olmo2ForCausalLM`), as in transformers' `modeling_olmo2.py`
//! (`Olmo2DecoderLayer.forward`): the Llama layer's projections and gated MLP, but with
//! no norm before attention or MLP; instead an RMSNorm on each one's output before it is
//! added to the residual stream (`post_attention_layernorm`,
//! `post_feedforward_layernorm`), and RMSNorms over the whole query and key projections
//! (`q_norm [heads * head_dim]`, `k_norm [kv_heads * head_dim]`) before the rotary
//! embedding. Tensor names are spelled here and nowhere else.

use super::backend::{Backend, GatedMlp, Heads, Linear, Norm, Qkv, TensorLookup, WeightError};
use super::config::ModelConfig;
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
    q: Linear<T>,
    k: Linear<T>,
    v: Linear<T>,
    o: Linear<T>,
    q_norm: Norm<T>,
    k_norm: Norm<T>,
    post_attention_norm: Norm<T>,
    post_feedforward_norm: Norm<T>,
    mlp: GatedMlp<T>,
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
            q: l.linear(&format!("{p}.self_attn.q_proj"), qd, h, c.qkv_bias)?,
            k: l.linear(&format!("{p}.self_attn.k_proj"), kvd, h, c.qkv_bias)?,
            v: l.linear(&format!("{p}.self_attn.v_proj"), kvd, h, c.qkv_bias)?,
            o: l.linear(&format!("{p}.self_attn.o_proj"), h, qd, c.o_bias)?,
            q_norm: l.norm(&format!("{p}.self_attn.q_norm"), qd, false)?,
            k_norm: l.norm(&format!("{p}.self_attn.k_norm"), kvd, false)?,
            post_attention_norm: l.norm(&format!("{p}.post_attention_layernorm"), h, false)?,
            post_feedforward_norm: l.norm(&format!("{p}.post_feedforward_layernorm"), h, false)?,
            mlp: GatedMlp::load(l, c, &format!("{p}.mlp"))?,
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
    let mut input = b.input(rows * h)?;
    let (mut q, mut k, mut v) = (b.rows(rows * qd)?, b.rows(rows * kvd)?, b.rows(rows * kvd)?);
    let mut att = b.input(rows * qd)?;
    let mut out = b.rows(rows * h)?;
    let (mut gate, mut up) = (
        b.rows(rows * c.intermediate)?,
        b.rows(rows * c.intermediate)?,
    );
    let (q_heads, kv_heads) = Heads::separate(c);
    for l in layers {
        b.to_input(x, &mut input, rows)?;
        b.linear(&input, &l.q, &mut q, rows)?;
        b.linear(&input, &l.k, &mut k, rows)?;
        b.linear(&input, &l.v, &mut v, rows)?;
        b.group_norm(&mut q, &l.q_norm, qd, rows)?;
        b.group_norm(&mut k, &l.k_norm, kvd, rows)?;
        let qkv = Qkv::Separate {
            q: &mut q,
            k: &mut k,
            v: &v,
        };
        b.attention(
            qkv,
            [q_heads, kv_heads, kv_heads],
            true,
            &mut att,
            rows,
            seq,
        )?;
        b.linear(&att, &l.o, &mut out, rows)?;
        b.norm_add(&out, &l.post_attention_norm, x, rows)?;
        b.to_input(x, &mut input, rows)?;
        b.zero(&mut out)?;
        l.mlp.add(b, &input, (&mut gate, &mut up), &mut out, rows)?;
        b.norm_add(&out, &l.post_feedforward_norm, x, rows)?;
    }
    Ok(())
}
