//! The interface between an architecture and a device: the operations a decoder layer is
//! made of (norms, linear layers, causal attention with rotary positions, the MLP's tail),
//! and the typed tables of a layer's tensors, found once by name when the model is
//! loaded. Each architecture module (`llama`, `neox`) writes its layer once over
//! [`Backend`]; the CPU reference (`model::cpu`) and the GPU (`crate::gpu`) implement it.
//!
//! What stays true across backends: operations run in the order the architecture calls
//! them, the residual stream is f32, and `linear_add` is one f32 rounding of the product
//! added to the stream (a separate add on the CPU, the GEMM's epilogue on the GPU).

use super::config::ModelConfig;

/// A linear layer's tensors: `weight [out, inp]` and an optional `bias [out]`.
#[derive(Clone, Copy, Debug)]
pub struct Linear<T> {
    pub weight: T,
    pub bias: Option<T>,
    pub out: usize,
    pub inp: usize,
}

/// A norm's tensors: RMSNorm (a weight), LayerNorm (a weight and a bias), or OLMo's
/// LayerNorm without parameters (neither).
#[derive(Clone, Copy, Debug)]
pub struct Norm<T> {
    pub weight: Option<T>,
    pub bias: Option<T>,
}

impl<T> Norm<T> {
    /// OLMo's LayerNorm without learned parameters.
    pub fn plain() -> Norm<T> {
        Norm {
            weight: None,
            bias: None,
        }
    }
}

/// The gated MLP of the Llama family (`{prefix}.gate_proj`, `up_proj`, `down_proj`):
/// `down(act(gate(x)) * up(x))`.
#[derive(Clone, Copy, Debug)]
pub struct GatedMlp<T> {
    gate: Linear<T>,
    up: Linear<T>,
    down: Linear<T>,
}

impl<T: Copy> GatedMlp<T> {
    /// The MLP under `prefix` (`model.layers.3.mlp`), with the shapes `c` implies.
    pub fn load<L: TensorLookup<Tensor = T>>(
        l: &L,
        c: &ModelConfig,
        prefix: &str,
    ) -> Result<GatedMlp<T>, WeightError> {
        let (h, i, bias) = (c.hidden, c.intermediate, c.mlp_bias);
        Ok(GatedMlp {
            gate: l.linear(&format!("{prefix}.gate_proj"), i, h, bias)?,
            up: l.linear(&format!("{prefix}.up_proj"), i, h, bias)?,
            down: l.linear(&format!("{prefix}.down_proj"), h, i, bias)?,
        })
    }

    /// `residual += down(act(gate(x)) * up(x))`, with `gate` and `up` as scratch rows
    /// (`rows x intermediate` each).
    pub fn add<B: Backend<Tensor = T>>(
        &self,
        b: &B,
        x: &B::Input,
        (gate, up): (&mut B::Rows, &mut B::Rows),
        residual: &mut B::Rows,
        rows: usize,
    ) -> Result<(), B::Error> {
        b.linear(x, &self.gate, gate, rows)?;
        b.linear(x, &self.up, up, rows)?;
        b.mlp_out(gate, Some(up), &self.down, residual, rows)
    }
}

/// The final norm and the output head (the embedding itself when tied).
#[derive(Clone, Copy, Debug)]
pub struct Head<T> {
    pub norm: Norm<T>,
    pub lm_head: T,
}

/// Where one of q, k, v lies in its projection rows: head `j` starts at
/// `offset + j * head_stride` of each row of `row_stride` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub row_stride: usize,
    pub offset: usize,
    pub head_stride: usize,
    pub heads: usize,
}

impl Heads {
    /// The layouts of separate q, k and v projections (`[rows, heads * head_dim]` and
    /// `[rows, kv_heads * head_dim]`): `(q, k and v)`.
    pub fn separate(c: &ModelConfig) -> (Heads, Heads) {
        let q = Heads {
            row_stride: c.heads * c.head_dim,
            offset: 0,
            head_stride: c.head_dim,
            heads: c.heads,
        };
        let kv = Heads {
            row_stride: c.kv_heads * c.head_dim,
            heads: c.kv_heads,
            ..q
        };
        (q, kv)
    }
}

/// The attention's inputs: separate q, k and v projections (Llama), or one fused
/// projection holding all three (GPT-NeoX). q and k are rotated in place where a backend
/// rotates them before the product.
pub enum Qkv<'a, R> {
    Separate {
        q: &'a mut R,
        k: &'a mut R,
        v: &'a R,
    },
    Fused(&'a mut R),
}

/// The operations a decoder layer is made of, on one device.
pub trait Backend {
    /// A handle to one tensor of the merged weights.
    type Tensor: Copy;
    /// f32 rows: the residual stream and the projections' outputs.
    type Rows;
    /// Rows a product reads (normalised or attended rows): f32 on the CPU, the model's
    /// compute dtype on the GPU.
    type Input;
    type Error;

    fn config(&self) -> &ModelConfig;
    /// `n` f32 values (contents unspecified: every caller writes before it reads).
    fn rows(&self, n: usize) -> Result<Self::Rows, Self::Error>;
    /// `n` values of product input.
    fn input(&self, n: usize) -> Result<Self::Input, Self::Error>;
    /// `out = norm(x)` over `rows` rows of the hidden size.
    fn norm(
        &self,
        x: &Self::Rows,
        w: &Norm<Self::Tensor>,
        out: &mut Self::Input,
        rows: usize,
    ) -> Result<(), Self::Error>;
    /// `out[rows, w.out] = x W^T (+ b)`.
    fn linear(
        &self,
        x: &Self::Input,
        w: &Linear<Self::Tensor>,
        out: &mut Self::Rows,
        rows: usize,
    ) -> Result<(), Self::Error>;
    /// `residual += x W^T (+ b)`.
    fn linear_add(
        &self,
        x: &Self::Input,
        w: &Linear<Self::Tensor>,
        residual: &mut Self::Rows,
        rows: usize,
    ) -> Result<(), Self::Error>;
    /// Causal self-attention of `rows` rows (windows of `seq`) with rotary positions on q
    /// and k (unless `rope` is false: SmolLM3's NoPE layers), laid out as `heads` says
    /// (q, k, v); the output rows are `[rows, q heads * head_dim]`.
    fn attention(
        &self,
        qkv: Qkv<'_, Self::Rows>,
        heads: [Heads; 3],
        rope: bool,
        out: &mut Self::Input,
        rows: usize,
        seq: usize,
    ) -> Result<(), Self::Error>;
    /// `out = x` in the product input's dtype: for layers whose projections read the
    /// residual stream itself (OLMo 2 has no pre-norm).
    fn to_input(
        &self,
        x: &Self::Rows,
        out: &mut Self::Input,
        rows: usize,
    ) -> Result<(), Self::Error>;
    /// `residual += norm(x)` over `rows` rows of the hidden size: OLMo 2's norms on the
    /// attention and MLP outputs.
    fn norm_add(
        &self,
        x: &Self::Rows,
        w: &Norm<Self::Tensor>,
        residual: &mut Self::Rows,
        rows: usize,
    ) -> Result<(), Self::Error>;
    /// Clamps every value of `x` to `[-limit, limit]` (OLMo's `clip_qkv`).
    fn clamp(&self, x: &mut Self::Rows, limit: f32) -> Result<(), Self::Error>;
    /// Sets every value of `x` to zero.
    fn zero(&self, x: &mut Self::Rows) -> Result<(), Self::Error>;
    /// RMSNorm in place over each group of `width` consecutive values of `x` (`rows`
    /// rows), with `w`'s `[width]` weight: the q/k norms of Qwen3 (per head) and OLMo 2
    /// (over the whole projection).
    fn group_norm(
        &self,
        x: &mut Self::Rows,
        w: &Norm<Self::Tensor>,
        width: usize,
        rows: usize,
    ) -> Result<(), Self::Error>;
    /// The MLP's tail: `act(gate) (* up)`, then `residual += that x down^T (+ b)`.
    /// `gate` may be overwritten.
    fn mlp_out(
        &self,
        gate: &mut Self::Rows,
        up: Option<&Self::Rows>,
        down: &Linear<Self::Tensor>,
        residual: &mut Self::Rows,
        rows: usize,
    ) -> Result<(), Self::Error>;
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

/// Where a backend finds the tensors of the part of the model it holds.
pub trait TensorLookup {
    type Tensor: Copy;
    /// The tensor named `name` and its shape, if held.
    fn find(&self, name: &str) -> Option<(Self::Tensor, &[usize])>;

    /// Tensor `name`, which must have `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Self::Tensor, WeightError> {
        let (t, got) = self
            .find(name)
            .ok_or_else(|| WeightError::Missing(name.into()))?;
        if got != shape {
            return Err(WeightError::Shape {
                name: name.into(),
                got: got.to_vec(),
                want: shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// `{prefix}.weight [out, inp]` and, with `bias`, `{prefix}.bias [out]`.
    fn linear(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear<Self::Tensor>, WeightError> {
        Ok(Linear {
            weight: self.get(&format!("{prefix}.weight"), &[out, inp])?,
            bias: if bias {
                Some(self.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
            out,
            inp,
        })
    }

    /// `{prefix}.weight [h]` and, for a LayerNorm (`bias`), `{prefix}.bias [h]`.
    fn norm(&self, prefix: &str, h: usize, bias: bool) -> Result<Norm<Self::Tensor>, WeightError> {
        Ok(Norm {
            weight: Some(self.get(&format!("{prefix}.weight"), &[h])?),
            bias: if bias {
                Some(self.get(&format!("{prefix}.bias"), &[h])?)
            } else {
                None
            },
        })
    }
}
