//! GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): LayerNorms with biases, one fused q/k/v
//! projection laid out per head as `[q | k | v]`, partial rotary, a plain MLP, and the
//! parallel residual (`x + attn(ln1(x)) + mlp(ln2(x))`) where the config asks for it, as
//! in transformers' `modeling_gpt_neox.py` (`GPTNeoXLayer.forward`). Tensor names are
//! spelled here and nowhere else.

use super::backend::{Backend, Heads, Linear, Norm, Qkv, TensorLookup, WeightError};
use super::config::ModelConfig;
use super::Names;

pub const NAMES: Names = Names {
    layers: "gpt_neox.layers",
    embed: "gpt_neox.embed_in.weight",
    final_norm: "gpt_neox.final_layer_norm",
    lm_head: "embed_out.weight",
    norm_bias: true,
};

/// One decoder layer's tensors.
pub struct Layer<T> {
    ln1: Norm<T>,
    ln2: Norm<T>,
    qkv: Linear<T>,
    dense: Linear<T>,
    fc_in: Linear<T>,
    fc_out: Linear<T>,
}

impl<T: Copy> Layer<T> {
    /// Layer `i`'s tensors, with the shapes `c` implies.
    pub fn load<L: TensorLookup<Tensor = T>>(
        l: &L,
        c: &ModelConfig,
        i: usize,
    ) -> Result<Layer<T>, WeightError> {
        let p = NAMES.layer(i);
        let h = c.hidden;
        Ok(Layer {
            ln1: l.norm(&format!("{p}.input_layernorm"), h, true)?,
            ln2: l.norm(&format!("{p}.post_attention_layernorm"), h, true)?,
            qkv: l.linear(&format!("{p}.attention.query_key_value"), 3 * h, h, true)?,
            dense: l.linear(&format!("{p}.attention.dense"), h, h, true)?,
            fc_in: l.linear(&format!("{p}.mlp.dense_h_to_4h"), c.intermediate, h, true)?,
            fc_out: l.linear(&format!("{p}.mlp.dense_4h_to_h"), h, c.intermediate, true)?,
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
    let mut normed = b.input(rows * h)?;
    let mut qkv = b.rows(rows * 3 * h)?;
    let mut att = b.input(rows * h)?;
    let mut mid = b.rows(rows * c.intermediate)?;
    // Per head the fused projection holds [q | k | v], each head_dim wide.
    let part = |offset| Heads {
        row_stride: 3 * h,
        offset,
        head_stride: 3 * hd,
        heads: c.heads,
    };
    for l in layers {
        b.norm(x, &l.ln1, &mut normed, rows)?;
        b.linear(&normed, &l.qkv, &mut qkv, rows)?;
        let heads = [part(0), part(hd), part(2 * hd)];
        b.attention(Qkv::Fused(&mut qkv), heads, true, &mut att, rows, seq)?;
        // With the parallel residual the MLP's norm reads x before the attention is
        // added (`normed` is free again once the q/k/v projection has read it).
        if c.parallel_residual {
            b.norm(x, &l.ln2, &mut normed, rows)?;
        }
        b.linear_add(&att, &l.dense, x, rows)?;
        if !c.parallel_residual {
            b.norm(x, &l.ln2, &mut normed, rows)?;
        }
        b.linear(&normed, &l.fc_in, &mut mid, rows)?;
        b.mlp_out(&mut mid, None, &l.fc_out, x, rows)?;
    }
    Ok(())
}
