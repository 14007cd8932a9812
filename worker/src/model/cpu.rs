//! The CPU backend: the reference every device is checked against. Weights are f32
//! buffers in a [`ParamStore`]; every operation is one of `ckmerge_kernels::ops`, in the
//! order the architecture calls it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;

use ckmerge_kernels::ops::{self, Activation, HeadLayout};

use super::backend::{Backend, Heads, Linear, Norm, Qkv, TensorLookup};
use super::config::ModelConfig;

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

impl TensorLookup for ParamStore {
    type Tensor = usize;
    fn find(&self, name: &str) -> Option<(usize, &[usize])> {
        self.index_of(name).map(|i| (i, self.shapes[i].as_slice()))
    }
}

/// The CPU operations over one store, for one forward pass.
pub struct Cpu<'a> {
    pub config: &'a ModelConfig,
    pub store: &'a ParamStore,
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// A product's output before it is added to the residual stream.
    scratch: RefCell<Vec<f32>>,
}

impl<'a> Cpu<'a> {
    pub fn new(
        config: &'a ModelConfig,
        store: &'a ParamStore,
        cos: &'a [f32],
        sin: &'a [f32],
    ) -> Cpu<'a> {
        Cpu {
            config,
            store,
            cos,
            sin,
            scratch: RefCell::new(Vec::new()),
        }
    }

    fn d(&self, t: usize) -> &[f32] {
        &self.store.data[t]
    }

    fn rope(&self, x: &mut [f32], h: Heads, seq: usize) {
        let c = self.config;
        ops::apply_rope(
            x,
            h.row_stride,
            h.offset,
            h.heads,
            h.head_stride,
            c.rot_dim,
            seq,
            self.cos,
            self.sin,
        );
    }
}

fn layout(h: Heads) -> HeadLayout {
    HeadLayout {
        row_stride: h.row_stride,
        head_stride: h.head_stride,
    }
}

impl Backend for Cpu<'_> {
    type Tensor = usize;
    type Rows = Vec<f32>;
    type Input = Vec<f32>;
    type Error = Infallible;

    fn config(&self) -> &ModelConfig {
        self.config
    }

    fn rows(&self, n: usize) -> Result<Vec<f32>, Infallible> {
        Ok(vec![0f32; n])
    }

    fn input(&self, n: usize) -> Result<Vec<f32>, Infallible> {
        Ok(vec![0f32; n])
    }

    fn norm(
        &self,
        x: &Vec<f32>,
        w: &Norm<usize>,
        out: &mut Vec<f32>,
        _rows: usize,
    ) -> Result<(), Infallible> {
        let eps = self.config.norm_eps;
        match (w.weight, w.bias) {
            (Some(g), None) => ops::rms_norm(x, self.d(g), eps, out),
            (Some(g), Some(b)) => ops::layer_norm(x, self.d(g), self.d(b), eps, out),
            (None, _) => ops::layer_norm_plain(x, self.config.hidden, eps, out),
        }
        Ok(())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &Linear<usize>,
        out: &mut Vec<f32>,
        rows: usize,
    ) -> Result<(), Infallible> {
        let bias = w.bias.map(|b| self.d(b));
        ops::linear(x, rows, w.inp, self.d(w.weight), w.out, bias, out);
        Ok(())
    }

    fn linear_add(
        &self,
        x: &Vec<f32>,
        w: &Linear<usize>,
        residual: &mut Vec<f32>,
        rows: usize,
    ) -> Result<(), Infallible> {
        let mut tmp = self.scratch.borrow_mut();
        tmp.resize(rows * w.out, 0.0);
        let bias = w.bias.map(|b| self.d(b));
        ops::linear(x, rows, w.inp, self.d(w.weight), w.out, bias, &mut tmp);
        ops::add_in_place(residual, &tmp);
        Ok(())
    }

    fn attention(
        &self,
        qkv: Qkv<'_, Vec<f32>>,
        [hq, hk, hv]: [Heads; 3],
        rope: bool,
        out: &mut Vec<f32>,
        rows: usize,
        seq: usize,
    ) -> Result<(), Infallible> {
        let c = self.config;
        let hd = c.head_dim;
        assert!(
            (hk.row_stride, hk.head_stride) == (hv.row_stride, hv.head_stride),
            "k and v must share a layout on the CPU"
        );
        let (q, k, v): (&[f32], &[f32], &[f32]) = match qkv {
            Qkv::Separate { q, k, v } => {
                if rope {
                    self.rope(q, hq, seq);
                    self.rope(k, hk, seq);
                }
                (q, k, v)
            }
            Qkv::Fused(x) => {
                if rope {
                    self.rope(x, hq, seq);
                    self.rope(x, hk, seq);
                }
                (x, x, x)
            }
        };
        let ol = HeadLayout {
            row_stride: hq.heads * hd,
            head_stride: hd,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        ops::causal_attention_biased(
            &q[hq.offset..],
            layout(hq),
            &k[hk.offset..],
            &v[hv.offset..],
            layout(hk),
            out,
            ol,
            rows / seq,
            seq,
            hq.heads,
            hk.heads,
            hd,
            scale,
            c.alibi.as_deref(),
        );
        Ok(())
    }

    fn to_input(&self, x: &Vec<f32>, out: &mut Vec<f32>, _rows: usize) -> Result<(), Infallible> {
        out.copy_from_slice(x);
        Ok(())
    }

    fn norm_add(
        &self,
        x: &Vec<f32>,
        w: &Norm<usize>,
        residual: &mut Vec<f32>,
        _rows: usize,
    ) -> Result<(), Infallible> {
        let mut tmp = self.scratch.borrow_mut();
        tmp.resize(x.len(), 0.0);
        let g = w.weight.expect("OLMo 2's output norms have weights");
        ops::rms_norm(x, self.d(g), self.config.norm_eps, &mut tmp);
        ops::add_in_place(residual, &tmp);
        Ok(())
    }

    fn clamp(&self, x: &mut Vec<f32>, limit: f32) -> Result<(), Infallible> {
        ops::clamp(x, limit);
        Ok(())
    }

    fn zero(&self, x: &mut Vec<f32>) -> Result<(), Infallible> {
        x.fill(0.0);
        Ok(())
    }

    fn group_norm(
        &self,
        x: &mut Vec<f32>,
        w: &Norm<usize>,
        width: usize,
        _rows: usize,
    ) -> Result<(), Infallible> {
        let weight = self.d(w.weight.expect("q/k norms have weights"));
        debug_assert_eq!(weight.len(), width);
        let mut tmp = self.scratch.borrow_mut();
        tmp.clear();
        tmp.extend_from_slice(x);
        ops::rms_norm(&tmp, weight, self.config.norm_eps, x);
        Ok(())
    }

    fn mlp_out(
        &self,
        gate: &mut Vec<f32>,
        up: Option<&Vec<f32>>,
        down: &Linear<usize>,
        residual: &mut Vec<f32>,
        rows: usize,
    ) -> Result<(), Infallible> {
        match (self.config.act, up) {
            (Activation::Silu, Some(up)) => ops::silu_mul(gate, up),
            (act, Some(up)) => {
                ops::activate(gate, act);
                gate.iter_mut().zip(up).for_each(|(g, u)| *g *= u);
            }
            (act, None) => ops::activate(gate, act),
        }
        self.linear_add(gate, down, residual, rows)
    }
}
