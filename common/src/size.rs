//! Byte sizes written the way Hugging Face writes them (`"5GB"`, `"500MB"`, `"2GiB"`).
//!
//! `transformers`' `max_shard_size` uses decimal units for `GB`/`MB`/`KB` and binary units
//! for `GiB`/`MiB`/`KiB`; ckmerge parses the same strings the same way so that a user's
//! `--max-shard-size 5GB` produces the shard boundaries they know from `save_pretrained`.

/// Parses `"5GB"`, `"10 MiB"`, `"123"` (bytes). Errors name the input.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid size `{s}`: expected a number with a unit, like 5GB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0f64.powi(4),
        other => {
            return Err(format!(
                "invalid size `{s}`: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let bytes = value * mult;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("invalid size `{s}`: must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Human-readable bytes for messages (`1.23 GB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_units() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100 kb").unwrap(), 100_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
    }

    #[test]
    fn rejects_nonsense() {
        assert!(parse_size("5 parsecs").unwrap_err().contains("parsecs"));
        assert!(parse_size("GB").is_err());
        assert!(parse_size("0").is_err());
    }
}
