//! `config.json` of the supported architectures, resolved once into [`ModelConfig`] with
//! every default settled, so the forward pass never looks at JSON. Both spellings that
//! transformers has used are read: 4.x (`rope_theta`, `rope_scaling`, `rotary_pct`) and
//! 5.x (`rope_parameters`).

use std::path::{Path, PathBuf};

use ckmerge_kernels::ops::Activation;
use serde_json::{Map, Value};

/// Architectures ckmerge can evaluate, by the name in `config.json`'s `architectures`.
pub const SUPPORTED: [&str; 9] = [
    "BaichuanForCausalLM",
    "LlamaForCausalLM",
    "SmolLM3ForCausalLM",
    "OlmoForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Olmo2ForCausalLM",
    "GPTNeoXForCausalLM",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama and its config-compatible relatives (Mistral, Qwen2, DeepSeek-LLM), Qwen3
    /// with its per-head q/k norms ([`ModelConfig::qk_norm`]), and OLMo with
    /// parameter-free LayerNorms and clipped q/k/v ([`ModelConfig::plain_norms`],
    /// [`ModelConfig::clip_qkv`]).
    Llama,
    /// GPT-NeoX / Pythia: fused QKV, LayerNorm with bias, partial rotary, parallel residual.
    GptNeoX,
    /// OLMo 2: no pre-norms; RMSNorms on the attention and MLP outputs before each
    /// residual add, and on the whole query and key projections.
    Olmo2,
    /// Baichuan 2 7B: fused `W_pack` q/k/v, a row-normalised output head.
    Baichuan,
}

/// RMSNorms on the query and key projections, before the rotary embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    /// Over each head, one `[head_dim]` weight shared by the heads (Qwen3).
    PerHead,
    /// Over the whole projection, `[heads * head_dim]` (OLMo 2).
    Whole,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear(f64),
    /// Llama 3's frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
    pub norm_eps: f32,
    pub act: Activation,
    pub tie_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2, `attention_bias`, always for NeoX).
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub rope_theta: f64,
    /// Rotated dimensions per head (all of `head_dim` unless partial rotary).
    pub rot_dim: usize,
    pub rope_scaling: RopeScaling,
    pub parallel_residual: bool,
    /// Mistral's sliding window, if any: windows longer than this are refused.
    pub sliding_window: Option<usize>,
    pub qk_norm: Option<QkNorm>,
    /// The `architectures` entry, for messages.
    pub name: String,
    /// Every norm is a LayerNorm without parameters, eps 1e-5 (OLMo).
    pub plain_norms: bool,
    /// Query, key and value projections clamped to `[-c, c]` (OLMo's `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// The output head's rows are L2-normalised before use (Baichuan 2's `NormHead`).
    pub norm_head: bool,
    /// ALiBi slopes per head in place of RoPE (Baichuan 13B).
    pub alibi: Option<Vec<f32>>,
    /// Per layer, whether its attention uses RoPE (SmolLM3's `no_rope_layers`: 1 = RoPE,
    /// 0 = none); `None`: every layer does.
    pub rope_layers: Option<Vec<bool>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub reason: String,
}

struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
}

impl Fields<'_> {
    fn err(&self, reason: String) -> ConfigError {
        ConfigError {
            file: self.file.into(),
            reason,
        }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing `{key}` (a positive integer)")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` is {v}; expected a positive integer"))),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` is {v}; expected a number"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` is {v}; expected true or false"))),
        }
    }
}

/// ALiBi slopes for `n` heads as Baichuan 13B computes them (`_get_interleave`, the
/// ALiBi paper's: a geometric series from 2^(-8/n) for a power of two; otherwise the
/// nearest lower power's slopes plus every other slope of twice that many), in f64, then
/// rounded to f32 as `torch.Tensor(list)` does.
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    fn interleave(n: usize) -> Vec<f64> {
        if n.is_power_of_two() {
            return power_of_two(n);
        }
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let mut out = power_of_two(p);
        out.extend(interleave(2 * p).into_iter().step_by(2).take(n - p));
        out
    }
    interleave(n).into_iter().map(|s| s as f32).collect()
}

impl ModelConfig {
    /// Resolves `config` (the contents of `file`) into a model configuration.
    pub fn from_json(config: &Map<String, Value>, file: &Path) -> Result<ModelConfig, ConfigError> {
        let f = Fields { map: config, file };
        let arch_name = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| {
                f.err(format!(
                    "no `architectures` entry; ckmerge evaluates {}",
                    SUPPORTED.join(", ")
                ))
            })?;
        let arch = match arch_name {
            "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"
            | "Qwen3ForCausalLM" | "OlmoForCausalLM" | "SmolLM3ForCausalLM" => Arch::Llama,
            "GPTNeoXForCausalLM" => Arch::GptNeoX,
            "Olmo2ForCausalLM" => Arch::Olmo2,
            "BaichuanForCausalLM" => Arch::Baichuan,
            other => {
                return Err(f.err(format!(
                    "architecture `{other}` is not supported for evaluation; supported: {} (merging works for any architecture)",
                    SUPPORTED.join(", ")
                )))
            }
        };
        let hidden = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        let kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden / heads);
        if !heads.is_multiple_of(kv_heads) {
            return Err(f.err(format!(
                "num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        if arch == Arch::GptNeoX && head_dim * heads != hidden {
            return Err(f.err(format!(
                "hidden_size ({hidden}) is not num_attention_heads ({heads}) x head size"
            )));
        }
        let act_name =
            f.get("hidden_act")
                .and_then(|v| v.as_str())
                .unwrap_or(if arch == Arch::GptNeoX {
                    "gelu"
                } else {
                    "silu"
                });
        let act = Activation::from_hf(act_name).ok_or_else(|| {
            f.err(format!(
                "`hidden_act` `{act_name}` is not supported (silu, gelu, gelu_new, relu)"
            ))
        })?;

        // RoPE: transformers 5 nests everything in `rope_parameters`; 4.x used top-level
        // `rope_theta` / `rope_scaling`, and NeoX `rotary_pct` / `rotary_emb_base`.
        let empty = Map::new();
        let rp = config
            .get("rope_parameters")
            .and_then(|v| v.as_object())
            .unwrap_or(&empty);
        let rs = config.get("rope_scaling").and_then(|v| v.as_object());
        let rpf = Fields { map: rp, file };
        let theta = match rp.get("rope_theta") {
            Some(_) => rpf.f64_or("rope_theta", 10000.0)?,
            None => f.f64_or("rope_theta", f.f64_or("rotary_emb_base", 10000.0)?)?,
        };
        let partial = match rp.get("partial_rotary_factor") {
            Some(_) => rpf.f64_or("partial_rotary_factor", 1.0)?,
            None => f.f64_or("partial_rotary_factor", f.f64_or("rotary_pct", 1.0)?)?,
        };
        let rot_dim = ((head_dim as f64 * partial) as usize) & !1;
        let scaling_map = if rp.contains_key("rope_type") {
            Some(rp)
        } else {
            rs
        };
        let rope_scaling = match scaling_map {
            None => RopeScaling::None,
            Some(m) => {
                let sf = Fields { map: m, file };
                let kind = m
                    .get("rope_type")
                    .or_else(|| m.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear(sf.f64_or("factor", 1.0)?),
                    "llama3" => RopeScaling::Llama3 {
                        factor: sf.f64_or("factor", 8.0)?,
                        low_freq_factor: sf.f64_or("low_freq_factor", 1.0)?,
                        high_freq_factor: sf.f64_or("high_freq_factor", 4.0)?,
                        original_max_position: sf
                            .f64_or("original_max_position_embeddings", 8192.0)?,
                    },
                    other => {
                        return Err(f.err(format!(
                            "rope type `{other}` is not supported (default, linear, llama3)"
                        )))
                    }
                }
            }
        };

        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let attention_bias = f.bool_or("attention_bias", arch == Arch::GptNeoX)?;
        let qkv_bias = attention_bias || model_type == "qwen2" || arch_name == "Qwen2ForCausalLM";
        let o_bias = attention_bias;
        let sliding_window =
            if f.bool_or("use_sliding_window", arch_name == "MistralForCausalLM")? {
                f.opt_usize("sliding_window")?
            } else {
                None
            };
        let olmo = arch_name == "OlmoForCausalLM";
        // Baichuan's 13B models use ALiBi where the 7B uses RoPE, and their configs do not
        // say which. vLLM tells them apart by hidden size (4096: RoPE, else ALiBi); every
        // released 13B has 5120 and no `max_position_embeddings` (its code reads
        // `model_max_length`). RoPE here: hidden 4096, or a config with
        // `max_position_embeddings` that is not 5120 wide (small models of the 7B's design).
        let alibi = arch == Arch::Baichuan
            && hidden != 4096
            && (hidden == 5120 || f.get("max_position_embeddings").is_none());
        let clip_qkv = match f.get("clip_qkv") {
            None => None,
            Some(v) => Some(v.as_f64().filter(|c| *c > 0.0).ok_or_else(|| {
                f.err(format!(
                    "`clip_qkv` is {v}; expected a positive number or null"
                ))
            })? as f32),
        };
        let layers = f.usize("num_hidden_layers")?;
        let rope_layers = if arch_name == "SmolLM3ForCausalLM" {
            Some(match f.get("no_rope_layers") {
                Some(v) => {
                    let flags = v.as_array().filter(|a| a.len() >= layers).and_then(|a| {
                        a[..layers]
                            .iter()
                            .map(|x| x.as_u64().filter(|&n| n <= 1).map(|n| n == 1))
                            .collect::<Option<Vec<bool>>>()
                    });
                    flags.ok_or_else(|| {
                        f.err(format!(
                            "`no_rope_layers` is {v}; expected a list of 0 or 1 for each of the {layers} layers"
                        ))
                    })?
                }
                // transformers' default: no RoPE on every `no_rope_layer_interval`-th layer.
                None => {
                    let every = f.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
                    (0..layers).map(|i| (i + 1) % every != 0).collect()
                }
            })
        } else {
            None
        };
        let norm_key = if arch == Arch::GptNeoX {
            "layer_norm_eps"
        } else {
            "rms_norm_eps"
        };
        Ok(ModelConfig {
            arch,
            vocab: f.usize("vocab_size")?,
            hidden,
            intermediate: f.usize("intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            max_positions: match f.opt_usize("max_position_embeddings")? {
                Some(n) => n,
                None => f.opt_usize("model_max_length")?.unwrap_or(2048),
            },
            // OLMo's LayerNorm has its eps written into the code, not the config.
            norm_eps: if olmo {
                1e-5
            } else {
                f.f64_or(norm_key, 1e-5)? as f32
            },
            act,
            tie_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias: f.bool_or("mlp_bias", arch == Arch::GptNeoX)?,
            rope_theta: theta,
            rot_dim,
            rope_scaling,
            parallel_residual: f.bool_or("use_parallel_residual", arch == Arch::GptNeoX)?,
            sliding_window,
            qk_norm: match arch_name {
                "Qwen3ForCausalLM" => Some(QkNorm::PerHead),
                "Olmo2ForCausalLM" => Some(QkNorm::Whole),
                _ => None,
            },
            name: arch_name.to_owned(),
            plain_norms: olmo,
            clip_qkv,
            rope_layers,
            norm_head: arch == Arch::Baichuan,
            alibi: alibi.then(|| alibi_slopes(heads)),
        })
    }

    /// RoPE inverse frequencies, computed in f32 as transformers does (so angles round the
    /// same way), then scaled per `rope_scaling`.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.rot_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| {
                let e = (2 * i) as f32 / d as f32;
                (1.0f32 / (self.rope_theta as f32).powf(e)) as f64
            })
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear(f) => base.iter().map(|x| x / f).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}
