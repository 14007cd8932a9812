//! The floating-point element types ckmerge reads and writes.
//!
//! Checkpoints of LLM pretraining runs are stored in F32, BF16 or F16; those are the
//! types a linear merge is meaningful for. Integer or 8-bit float tensors are refused
//! with an error naming the tensor rather than merged in some guessed way.

use std::fmt;
use std::str::FromStr;

/// Element type of a tensor that ckmerge can merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The name used in safetensors headers (`"F32"`, `"BF16"`, `"F16"`).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
        }
    }

    /// The name `transformers` writes as `torch_dtype` / `dtype` in `config.json`.
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Maps a safetensors dtype; `None` for the types ckmerge does not merge.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

impl FromStr for DType {
    type Err = String;

    /// Accepts the safetensors and the torch spellings, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            _ => Err(format!(
                "unknown dtype `{s}`: expected one of f32, bf16, f16"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_spellings() {
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("F16".parse::<DType>().unwrap(), DType::F16);
        assert_eq!("fp32".parse::<DType>().unwrap(), DType::F32);
        assert!("int8".parse::<DType>().unwrap_err().contains("int8"));
    }
}
