//! Held-out data: files into one token stream, and the stream into scoring windows.
//!
//! The convention (documented in README.md, reproduced by the fixture script that writes
//! the transformers goldens):
//! - a `.txt` file is one document; a `.jsonl` file holds one document per line, in its
//!   `"text"` field; a directory contributes its `.txt`, `.jsonl`, `.npy` and `.bin` files
//!   recursively, in path order; files are read in the order given;
//! - a document is encoded with the tokenizer's special tokens (`add_special_tokens`); if
//!   that does not start it with a BOS token distinct from EOS (Llama does, GPT-NeoX does
//!   not), an EOS token is appended; documents are concatenated;
//! - `.npy` (integer dtypes) and `.bin` (raw little-endian u16, or u32 when the vocabulary
//!   exceeds 65536 or `--token-bits 32`) are token streams used as they are;
//! - `--max-tokens` keeps the first tokens of the stream;
//! - windows: without a stride, non-overlapping windows of `seq_len` tokens (a trailing
//!   partial window is dropped), each scoring its last `seq_len - 1` tokens (every token but
//!   the first, which has no context); with `--stride s`, the sliding windows of the
//!   Hugging Face perplexity guide: windows start every `s` tokens, each `seq_len` long (the
//!   last one cut at the end of the stream), each scoring only the tokens not scored by the
//!   previous window.
//!
//! Every candidate of a search is scored on exactly these windows.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("{dir}: no tokenizer.json; text data (.txt, .jsonl) needs the checkpoint's tokenizer (save it with `tokenizer.save_pretrained(dir)`), or pass pre-tokenized .npy/.bin data")]
    NoTokenizer { dir: PathBuf },
    #[error("the data holds {tokens} tokens, fewer than one window of {seq_len}; add data or lower --seq-len")]
    TooShort { tokens: usize, seq_len: usize },
}

fn bad(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Bad {
        path: path.into(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |cause| DataError::Io {
        path: path.into(),
        cause,
    }
}

/// A checkpoint's tokenizer with the special tokens that delimit documents.
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`; BOS and EOS come from `tokenizer_config.json`, else from
    /// `config.json`'s `bos_token_id` / `eos_token_id`.
    pub fn load(dir: &Path) -> Result<TextTokenizer, DataError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DataError::NoTokenizer { dir: dir.into() });
        }
        let tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| bad(&path, format!("cannot load the tokenizer: {e}")))?;
        let read_json = |name: &str| -> Option<serde_json::Map<String, Value>> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            serde_json::from_str::<Value>(&text)
                .ok()?
                .as_object()
                .cloned()
        };
        let tc = read_json("tokenizer_config.json").unwrap_or_default();
        let config = read_json("config.json").unwrap_or_default();
        let special = |key: &str| -> Option<u32> {
            let from_tc = match tc.get(&format!("{key}_token")) {
                Some(Value::String(s)) => tok.token_to_id(s),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .and_then(|s| tok.token_to_id(s)),
                _ => None,
            };
            from_tc.or_else(|| match config.get(&format!("{key}_token_id")) {
                Some(Value::Number(n)) => n.as_u64().map(|n| n as u32),
                Some(Value::Array(a)) => a.first().and_then(|n| n.as_u64()).map(|n| n as u32),
                _ => None,
            })
        };
        Ok(TextTokenizer {
            bos: special("bos"),
            eos: special("eos"),
            tok,
        })
    }

    /// Tokens of `text`, with the tokenizer's special tokens when `special` (as
    /// `tokenizer.encode(text, add_special_tokens=special)`).
    pub fn encode(&self, text: &str, special: bool, path: &Path) -> Result<Vec<u32>, DataError> {
        Ok(self
            .tok
            .encode(text, special)
            .map_err(|e| bad(path, format!("tokenizer failed: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The text of token `id` as the tokenizer decodes it alone.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tok.decode(&[id], false).ok()
    }

    /// Tokens of one document under the convention in the module docs.
    pub fn document(&self, text: &str, path: &Path) -> Result<Vec<u32>, DataError> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| bad(path, format!("tokenizer failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let bos_led =
            matches!((self.bos, ids.first()), (Some(b), Some(&f)) if f == b && Some(b) != self.eos);
        if !bos_led {
            if let Some(e) = self.eos {
                ids.push(e);
            }
        }
        Ok(ids)
    }
}

pub use ckmerge_common::TokenBits;

/// Reads `paths` into one token stream. `tokenizer` is needed only for text files; every
/// token must be below `vocab`.
pub fn load_tokens(
    paths: &[PathBuf],
    tokenizer: &dyn Fn() -> Result<TextTokenizer, DataError>,
    vocab: usize,
    bin_bits: Option<TokenBits>,
) -> Result<Vec<u32>, DataError> {
    let files = data_files(paths)?;
    let mut tok: Option<TextTokenizer> = None;
    let mut out = Vec::new();
    for f in &files {
        let ext = f
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let start = out.len();
        match ext.as_str() {
            "txt" | "jsonl" => {
                if tok.is_none() {
                    tok = Some(tokenizer()?);
                }
                let t = tok.as_ref().expect("just loaded");
                let text = std::fs::read_to_string(f).map_err(io(f))?;
                if ext == "txt" {
                    if !text.trim().is_empty() {
                        out.extend(t.document(&text, f)?);
                    }
                } else {
                    for (i, line) in text.lines().enumerate() {
                        if line.trim().is_empty() {
                            continue;
                        }
                        let v: Value = serde_json::from_str(line)
                            .map_err(|e| bad(f, format!("line {}: not JSON: {e}", i + 1)))?;
                        let doc = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                            bad(f, format!("line {}: no string field \"text\"", i + 1))
                        })?;
                        out.extend(t.document(doc, f)?);
                    }
                }
            }
            "npy" => out.extend(read_npy(f)?),
            "bin" => {
                let bytes = std::fs::read(f).map_err(io(f))?;
                let bits = bin_bits.unwrap_or(if vocab <= 1 << 16 {
                    TokenBits::U16
                } else {
                    TokenBits::U32
                });
                let w = if bits == TokenBits::U16 { 2 } else { 4 };
                if !bytes.len().is_multiple_of(w) {
                    return Err(bad(
                        f,
                        format!(
                            "{} bytes is not a whole number of {}-bit tokens",
                            bytes.len(),
                            w * 8
                        ),
                    ));
                }
                out.extend(bytes.chunks_exact(w).map(|c| match w {
                    2 => u16::from_le_bytes([c[0], c[1]]) as u32,
                    _ => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                }));
            }
            _ => {
                return Err(bad(
                    f,
                    "unknown data format; use .txt, .jsonl, .npy or .bin",
                ))
            }
        }
        if let Some(&t) = out[start..].iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(f, format!("token {t} is outside the model's vocabulary of {vocab}; the data was tokenized for another model")));
        }
    }
    Ok(out)
}

/// The files `paths` stand for, in the order they are read: a file as it is, a directory
/// its `.txt`, `.jsonl`, `.npy` and `.bin` files, recursively, in name order. A directory
/// reached twice (a symbolic-link loop, or a link to a directory already listed) is an
/// error: its files would be read again, silently.
pub fn data_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    let mut seen = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(io(p))?;
        if meta.is_dir() {
            let before = files.len();
            collect_dir(p, &mut files, &mut seen)?;
            if files.len() == before {
                return Err(bad(
                    p,
                    "directory holds no .txt, .jsonl, .npy or .bin files",
                ));
            }
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

fn collect_dir(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen: &mut Vec<PathBuf>,
) -> Result<(), DataError> {
    let real = dir.canonicalize().map_err(io(dir))?;
    if seen.contains(&real) {
        return Err(bad(
            dir,
            format!(
                "this directory ({}) is reached twice (a symbolic-link loop, or a link to a directory already listed); its files would be read again",
                real.display()
            ),
        ));
    }
    seen.push(real);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()).map_err(io(dir)))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_dir(&p, out, seen)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("txt" | "jsonl" | "npy" | "bin")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

/// A 1-D (or flattened C-order) NumPy array of integers.
fn read_npy(path: &Path) -> Result<Vec<u32>, DataError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file (bad magic)"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(path, format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad(path, "truncated .npy header"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[i..].trim_start_matches([':', ' ']))
    };
    let descr = field("descr")
        .and_then(|d| d.strip_prefix('\''))
        .and_then(|d| d.split('\'').next())
        .unwrap_or("");
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(bad(
            path,
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let data = &bytes[hstart + hlen..];
    let (w, signed) = match descr {
        "<u2" | "|u2" => (2, false),
        "<i2" => (2, true),
        "<u4" => (4, false),
        "<i4" => (4, true),
        "<u8" => (8, false),
        "<i8" => (8, true),
        other => {
            return Err(bad(
                path,
                format!("dtype `{other}` is not a little-endian integer type"),
            ))
        }
    };
    if !data.len().is_multiple_of(w) {
        return Err(bad(
            path,
            "data length is not a whole number of elements (truncated file?)",
        ));
    }
    // The header's shape promises a number of elements (any number of dimensions, read
    // in C order); a file holding more or fewer is damaged, not data to score.
    let shape = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad(path, "the .npy header has no shape"))?;
    let promised = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .try_fold(1usize, |n, d| {
            d.parse::<usize>().ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| bad(path, format!("cannot read the .npy shape ({shape})")))?;
    if data.len() / w != promised {
        return Err(bad(
            path,
            format!(
                "the header's shape ({shape}) promises {promised} elements but the file holds {} (truncated or damaged?)",
                data.len() / w
            ),
        ));
    }
    data.chunks_exact(w)
        .map(|c| {
            let v: i128 = match (w, signed) {
                (2, false) => u16::from_le_bytes([c[0], c[1]]) as i128,
                (2, true) => i16::from_le_bytes([c[0], c[1]]) as i128,
                (4, false) => u32::from_le_bytes(c.try_into().expect("4 bytes")) as i128,
                (4, true) => i32::from_le_bytes(c.try_into().expect("4 bytes")) as i128,
                (8, false) => u64::from_le_bytes(c.try_into().expect("8 bytes")) as i128,
                _ => i64::from_le_bytes(c.try_into().expect("8 bytes")) as i128,
            };
            u32::try_from(v).map_err(|_| bad(path, format!("token {v} is not a valid token id")))
        })
        .collect()
}

/// One batch of equal-shape windows laid end to end, ready for a forward pass: `seq`
/// tokens per window, the last `scored` positions of each scored.
#[derive(Clone, Debug)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub seq: usize,
    pub scored: usize,
}

/// One scoring window: tokens `start .. start + len` of the stream, the last `scored`
/// positions of which are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
    pub scored: usize,
}

/// The windows of a stream of `n` tokens (see the module docs).
pub fn windows(n: usize, seq_len: usize, stride: Option<usize>) -> Result<Vec<Window>, DataError> {
    if seq_len < 2 {
        return Err(bad(Path::new("--seq-len"), "must be at least 2"));
    }
    if n < seq_len {
        return Err(DataError::TooShort { tokens: n, seq_len });
    }
    match stride {
        None => Ok((0..n / seq_len)
            .map(|k| Window {
                start: k * seq_len,
                len: seq_len,
                scored: seq_len - 1,
            })
            .collect()),
        Some(s) => {
            if s == 0 || s > seq_len {
                return Err(bad(
                    Path::new("--stride"),
                    format!("must be between 1 and --seq-len ({seq_len})"),
                ));
            }
            let mut out = Vec::new();
            let mut prev_end = 0;
            let mut begin = 0;
            while begin < n {
                let end = (begin + seq_len).min(n);
                let len = end - begin;
                let scored = (end - prev_end).min(len - 1);
                if scored > 0 {
                    out.push(Window {
                        start: begin,
                        len,
                        scored,
                    });
                }
                prev_end = end;
                if end == n {
                    break;
                }
                begin += s;
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_overlapping_windows_drop_the_tail() {
        let w = windows(10, 4, None).unwrap();
        assert_eq!(
            w,
            vec![
                Window {
                    start: 0,
                    len: 4,
                    scored: 3
                },
                Window {
                    start: 4,
                    len: 4,
                    scored: 3
                }
            ]
        );
        assert!(matches!(
            windows(3, 4, None),
            Err(DataError::TooShort {
                tokens: 3,
                seq_len: 4
            })
        ));
    }

    #[test]
    fn strided_windows_follow_the_hugging_face_guide() {
        // begin 0: [0,4) scores 3 (all but the first); begin 2: [2,6) scores the 2 new
        // tokens; begin 4: [4,8); begin 6: [6,9) cut at the end, scores 1.
        let w = windows(9, 4, Some(2)).unwrap();
        let got: Vec<_> = w.iter().map(|w| (w.start, w.len, w.scored)).collect();
        assert_eq!(got, vec![(0, 4, 3), (2, 4, 2), (4, 4, 2), (6, 3, 1)]);
        let total: usize = w.iter().map(|w| w.scored).sum();
        assert_eq!(total, 8, "every token but the first is scored exactly once");
    }

    #[test]
    fn a_symlink_loop_in_a_data_directory_is_an_error_not_a_repeat() {
        // Issue 14, item 11: a loop read the same file about 40 times, silently.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("a.txt"), "hello").unwrap();
        std::os::unix::fs::symlink(&d, d.join("again")).unwrap();
        let e = data_files(std::slice::from_ref(&d))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reached twice"), "{e}");
        std::fs::remove_file(d.join("again")).unwrap();
        assert_eq!(
            data_files(std::slice::from_ref(&d)).unwrap(),
            vec![d.join("a.txt")]
        );
    }

    #[test]
    fn npy_integer_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npy");
        let header = "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }";
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((h.len() as u16).to_le_bytes());
        bytes.extend(h.as_bytes());
        for v in [5i32, 0, 7] {
            bytes.extend(v.to_le_bytes());
        }
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read_npy(&p).unwrap(), vec![5, 0, 7]);
        // Issue 14, item 8: a header that promises more (or fewer) elements than the file
        // holds is damage, not data.
        let short = dir.path().join("short.npy");
        std::fs::write(&short, &bytes[..bytes.len() - 4]).unwrap();
        let err = read_npy(&short).unwrap_err().to_string();
        assert!(
            err.contains("short.npy") && err.contains("promises 3 elements but the file holds 2"),
            "{err}"
        );
        let long = dir.path().join("long.npy");
        let mut more = bytes.clone();
        more.extend(9i32.to_le_bytes());
        std::fs::write(&long, &more).unwrap();
        assert!(read_npy(&long).unwrap_err().to_string().contains("holds 4"));
        let none = || -> Result<TextTokenizer, DataError> { unreachable!("no text here") };
        let err = load_tokens(&[p], &none, 6, None).unwrap_err().to_string();
        assert!(err.contains("token 7 is outside"), "{err}");
    }
}
