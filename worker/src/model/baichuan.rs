//! Baichuan 2 (`BaichuanForCausalLM`, the 7B: the model of the paper ckmerge implements),
//! whose modeling code ships with the checkpoints (`trust_remote_code`) rather than with
//! transformers: the Llama layer with q, k and v fused into one `W_pack [3 * hidden,
//! hidden]` projection (rows q, then k, then v), and a `NormHead`: the output head's rows
//! are L2-normalised at inference (`nn.functional.normalize(weight)`), so a merge merges
//! the raw head and the evaluator normalises it, as the model does
//! ([`super::ModelConfig::norm_head`], applied in `Model::head_nll`). The 13B uses ALiBi
//! instead of RoPE ([`super::ModelConfig::alibi`]; how the config says which is in
//! `config.rs`). Tensor names are spelled here and nowhere else.

use super::backend::{Backend, GatedMlp, Heads, Linear, Norm, Qkv, TensorLookup, WeightError};
use super::config::ModelConfig;
use super::Names;

pub const NAMES: Names = super::llama::NAMES;

/// One decoder layer's tensors.
pub struct Layer<T> {
    in_norm: Norm<T>,
    post_norm: Norm<T>,
    w_pack: Linear<T>,
    o: Linear<T>,
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
        let h = c.hidden;
        Ok(Layer {
            in_norm: l.norm(&format!("{p}.input_layernorm"), h, false)?,
            post_norm: l.norm(&format!("{p}.post_attention_layernorm"), h, false)?,
            w_pack: l.linear(&format!("{p}.self_attn.W_pack"), 3 * h, h, false)?,
            o: l.linear(&format!("{p}.self_attn.o_proj"), h, h, false)?,
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
    let mut normed = b.input(rows * h)?;
    let mut qkv = b.rows(rows * 3 * h)?;
    let mut att = b.input(rows * h)?;
    let (mut gate, mut up) = (
        b.rows(rows * c.intermediate)?,
        b.rows(rows * c.intermediate)?,
    );
    // W_pack's rows: q's heads, then k's, then v's.
    let part = |k: usize| Heads {
        row_stride: 3 * h,
        offset: k * h,
        head_stride: hd,
        heads: c.heads,
    };
    for l in layers {
        b.norm(x, &l.in_norm, &mut normed, rows)?;
        b.linear(&normed, &l.w_pack, &mut qkv, rows)?;
        let heads = [part(0), part(1), part(2)];
        // The 13B's ALiBi replaces RoPE (the backend adds it from the config).
        let rope = c.alibi.is_none();
        b.attention(Qkv::Fused(&mut qkv), heads, rope, &mut att, rows, seq)?;
        b.linear_add(&att, &l.o, x, rows)?;
        b.norm(x, &l.post_norm, &mut normed, rows)?;
        l.mlp.add(b, &normed, (&mut gate, &mut up), x, rows)?;
    }
    Ok(())
}
