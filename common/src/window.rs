//! How held-out data is cut into windows and batched: defined once, here, and used as it
//! is by `ckmerge eval`'s flags (clap), the search config's `[data]` table (serde), the
//! wire (`LoadSpec`) and the evaluator. Every field is optional: `None` means the
//! evaluator's default, settled where the model is known (see each field).
//!
//! Adding a window setting is one field here plus its use in the evaluator; the flag, the
//! config key, the wire and the resume check (the `data` table is part of a run's
//! objective key) follow from this definition.

use serde::{Deserialize, Serialize};

/// Window and batch settings for scoring held-out data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct WindowSpec {
    /// Window length (default: the model's max_position_embeddings, capped at 2048).
    #[arg(long)]
    pub seq_len: Option<usize>,

    /// Sliding windows with this stride, as in the Hugging Face perplexity guide
    /// (default: non-overlapping windows).
    #[arg(long)]
    pub stride: Option<usize>,

    /// Windows per forward pass (default: 8).
    #[arg(long)]
    pub batch: Option<usize>,

    /// Use only the first N tokens of each data set.
    #[arg(long)]
    pub max_tokens: Option<usize>,

    /// Width of raw .bin tokens (default: 16 if the vocabulary fits, else 32).
    #[arg(long, value_parser = parse_token_bits)]
    pub token_bits: Option<TokenBits>,
}

/// Windows per forward pass when [`WindowSpec::batch`] is not given.
pub const DEFAULT_BATCH: usize = 8;

impl WindowSpec {
    /// Windows per forward pass, the default settled (never 0).
    pub fn batch_or_default(&self) -> usize {
        self.batch.unwrap_or(DEFAULT_BATCH).max(1)
    }

    /// Refuses settings no model could use, naming the field; checked by the search
    /// config before any worker loads, and by the evaluator. (A `seq_len` beyond the
    /// model's context needs the model and is checked where it is known.)
    pub fn check(&self) -> Result<(), String> {
        if let Some(s) = self.seq_len.filter(|&s| s < 2) {
            return Err(format!(
                "seq_len = {s}: a window needs at least 2 tokens (one to predict)"
            ));
        }
        if let Some(s) = self.stride {
            let max = self
                .seq_len
                .map_or(String::new(), |l| format!(" and seq_len ({l})"));
            if s == 0 || self.seq_len.is_some_and(|l| s > l) {
                return Err(format!("stride = {s}: use a value between 1{max}"));
            }
        }
        if self.batch == Some(0) {
            return Err("batch = 0: use at least 1 window per forward pass".into());
        }
        if let Some(m) = self.max_tokens.filter(|&m| m < 2) {
            return Err(format!("max_tokens = {m}: use at least 2 tokens"));
        }
        Ok(())
    }
}

/// How raw `.bin` token files are stored. Written as the number 16 or 32 in configs and
/// on the command line; anything else is refused where it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum TokenBits {
    U16,
    U32,
}

impl TryFrom<u8> for TokenBits {
    type Error = String;
    fn try_from(b: u8) -> Result<TokenBits, String> {
        match b {
            16 => Ok(TokenBits::U16),
            32 => Ok(TokenBits::U32),
            b => Err(format!("token_bits = {b}: use 16 or 32")),
        }
    }
}

impl From<TokenBits> for u8 {
    fn from(b: TokenBits) -> u8 {
        match b {
            TokenBits::U16 => 16,
            TokenBits::U32 => 32,
        }
    }
}

fn parse_token_bits(s: &str) -> Result<TokenBits, String> {
    match s.trim() {
        "16" => Ok(TokenBits::U16),
        "32" => Ok(TokenBits::U32),
        _ => Err("use 16 or 32".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bits_are_the_numbers_16_and_32_everywhere() {
        let spec = WindowSpec {
            token_bits: Some(TokenBits::U32),
            ..WindowSpec::default()
        };
        let v = serde_json::to_value(spec).unwrap();
        assert_eq!(v["token_bits"], 32);
        let back: WindowSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, spec);
        let e = serde_json::from_str::<WindowSpec>(r#"{"token_bits": 12}"#).unwrap_err();
        assert!(e.to_string().contains("use 16 or 32"), "{e}");
        assert_eq!(parse_token_bits("16"), Ok(TokenBits::U16));
        assert!(parse_token_bits("8").is_err());
        assert_eq!(WindowSpec::default().batch_or_default(), DEFAULT_BATCH);
    }

    #[test]
    fn unusable_window_settings_are_refused_by_name() {
        let bad = |w: WindowSpec, field: &str| {
            let e = w.check().unwrap_err();
            assert!(e.starts_with(field), "{e}");
        };
        bad(
            WindowSpec {
                seq_len: Some(1),
                ..Default::default()
            },
            "seq_len = 1",
        );
        bad(
            WindowSpec {
                stride: Some(0),
                ..Default::default()
            },
            "stride = 0",
        );
        bad(
            WindowSpec {
                seq_len: Some(64),
                stride: Some(65),
                ..Default::default()
            },
            "stride = 65",
        );
        bad(
            WindowSpec {
                batch: Some(0),
                ..Default::default()
            },
            "batch = 0",
        );
        bad(
            WindowSpec {
                max_tokens: Some(0),
                ..Default::default()
            },
            "max_tokens = 0",
        );
        let ok = WindowSpec {
            seq_len: Some(64),
            stride: Some(64),
            batch: Some(1),
            ..Default::default()
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(WindowSpec::default().check(), Ok(()));
    }
}
