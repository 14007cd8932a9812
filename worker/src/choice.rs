//! Multiple-choice tasks, scored as EleutherAI's lm-evaluation-harness scores its
//! `multiple_choice` tasks with a Hugging Face causal model (`--model hf`, no few-shot
//! examples), so that `acc` and `acc_norm` here are the harness's.
//!
//! The format: a JSONL file, one item per line:
//! `{"context": "...", "choices": ["...", ...], "gold": 0, "target_delimiter": " "}`
//! (`target_delimiter` optional, default one space, as the harness's default).
//!
//! What the harness does, and this module reproduces (lm_eval/api/task.py,
//! lm_eval/api/model.py, lm_eval/models/huggingface.py):
//! - each choice is a request (context, delimiter + choice);
//! - trailing whitespace of the context (`str.rstrip()`) moves to the continuation;
//! - `whole = encode(context + continuation)`, `ctx = encode(context)`, both with the
//!   tokenizer's special tokens, and the continuation's tokens are `whole[len(ctx):]`;
//! - `ctx + cont` is cut from the left to the model's `max_position_embeddings + 1`
//!   tokens; all but the last token are the input, and the last `len(cont)` positions
//!   predict the continuation;
//! - the request's log-likelihood is the sum of those log-probabilities, `is_greedy` whether
//!   every continuation token is the argmax of its row (the first maximum on ties);
//! - `acc`: the argmax of the log-likelihoods is the gold index; `acc_norm`: the argmax of
//!   the log-likelihoods divided by each choice's length in characters (the choice without
//!   the delimiter, counted as Python counts `len(str)`: code points).
//!
//! Not reproduced: the harness's special case of a context that starts with the text of
//! the BOS token (it then encodes without special tokens); such contexts are refused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{DataError, TextTokenizer};

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
    #[serde(default = "default_delimiter")]
    pub target_delimiter: String,
}

fn default_delimiter() -> String {
    " ".into()
}

fn bad(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Bad {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Reads a task file, checking every item: a clear error names the line and the field.
pub fn load_items(path: &Path) -> Result<Vec<Item>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|cause| DataError::Io {
        path: path.into(),
        cause,
    })?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |why: String| bad(path, format!("line {}: {why}", i + 1));
        let item: Item = serde_json::from_str(line).map_err(|e| {
            at(format!(
                "{e} (a multiple-choice item is {{\"context\": str, \"choices\": [str, ...], \"gold\": index[, \"target_delimiter\": str]}})"
            ))
        })?;
        if item.context.is_empty() {
            return Err(at("`context` is empty (the harness needs a context)".into()));
        }
        if item.choices.len() < 2 {
            return Err(at(format!(
                "`choices` holds {} choice(s); a multiple-choice item needs two or more",
                item.choices.len()
            )));
        }
        if let Some(k) = item.choices.iter().position(|c| c.is_empty()) {
            return Err(at(format!(
                "choice {k} is empty (acc_norm divides by a choice's length)"
            )));
        }
        if item.gold >= item.choices.len() {
            return Err(at(format!(
                "`gold` is {} but there are {} choices (gold is a 0-based index)",
                item.gold,
                item.choices.len()
            )));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(bad(path, "no items (one JSON object per line)"));
    }
    Ok(items)
}

/// One (item, choice) pair as tokens: the model runs `input` and the last
/// `targets.len()` positions predict `targets`.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub item: usize,
    pub choice: usize,
    pub input: Vec<u32>,
    pub targets: Vec<u32>,
}

/// A task: its items and their requests, tokenized for one model.
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub items: Vec<Item>,
    pub requests: Vec<Request>,
}

/// The requests of `items` under `tok`, cut to `max_len` positions as the harness cuts
/// them (its `max_length` for a Hugging Face model is `max_position_embeddings`).
pub fn requests(
    items: &[Item],
    tok: &TextTokenizer,
    max_len: usize,
    path: &Path,
) -> Result<Vec<Request>, DataError> {
    let mut out = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let trimmed = it.context.trim_end();
        let moved = &it.context[trimmed.len()..];
        if trimmed.is_empty() {
            return Err(bad(
                path,
                format!("item {i}: the context is only whitespace"),
            ));
        }
        let ctx_enc = tok.encode(trimmed, true, path)?;
        if tok.bos.is_some_and(|b| {
            tok.token_text(b)
                .is_some_and(|t| !t.is_empty() && trimmed.starts_with(&t))
        }) {
            return Err(bad(
                path,
                format!("item {i}: the context starts with the BOS token's text, which the harness encodes differently; remove it"),
            ));
        }
        for (c, choice) in it.choices.iter().enumerate() {
            let cont = format!("{moved}{}{choice}", it.target_delimiter);
            let whole = tok.encode(&format!("{trimmed}{cont}"), true, path)?;
            if whole.len() <= ctx_enc.len() {
                return Err(bad(
                    path,
                    format!("item {i}, choice {c}: the continuation encodes to no tokens"),
                ));
            }
            let cont_enc = &whole[ctx_enc.len()..];
            if cont_enc.len() > max_len {
                return Err(bad(
                    path,
                    format!(
                        "item {i}, choice {c}: the continuation is {} tokens, longer than the model's {max_len} positions",
                        cont_enc.len()
                    ),
                ));
            }
            let mut full: Vec<u32> = ctx_enc.clone();
            full.extend_from_slice(cont_enc);
            let keep = full.len().min(max_len + 1);
            let full = &full[full.len() - keep..];
            let input = full[..full.len() - 1].to_vec();
            if input.len() < 2 {
                return Err(bad(
                    path,
                    format!("item {i}, choice {c}: context and continuation are {} tokens in all; at least 3 are needed", full.len()),
                ));
            }
            out.push(Request {
                item: i,
                choice: c,
                input,
                targets: cont_enc.to_vec(),
            });
        }
    }
    Ok(out)
}

/// The scores of one item.
#[derive(Clone, Debug, Serialize)]
pub struct ItemScore {
    /// Log-likelihood of each choice (with its delimiter) given the context.
    pub lls: Vec<f64>,
    pub greedy: Vec<bool>,
    pub acc: f64,
    pub acc_norm: f64,
}

/// A task's scores.
#[derive(Clone, Debug, Serialize)]
pub struct TaskScore {
    pub name: String,
    pub items: usize,
    pub acc: f64,
    pub acc_norm: f64,
    /// Mean log-likelihood of the gold choice.
    pub gold_ll: f64,
    /// Mean cross-entropy of the gold choice among the choices,
    /// `-log softmax(lls)[gold]`: smooth in the weights, unlike acc (a search objective).
    pub choice_nll: f64,
    #[serde(skip)]
    pub per_item: Vec<ItemScore>,
}

/// The first index of the largest value (numpy's `argmax`).
fn argmax(v: impl Iterator<Item = f64>) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, x) in v.enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |b| b.0)
}

/// The cross-entropy of the gold choice among the choices, `-log softmax(lls)[gold]`:
/// one item's share of a task's `choice_nll`.
pub fn choice_nll(lls: &[f64], gold: usize) -> f64 {
    let max = lls.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + lls.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    lse - lls[gold]
}

/// Scores from the requests' (log-likelihood, is-greedy) results, in request order.
pub fn score(task: &Task, results: &[(f64, bool)]) -> TaskScore {
    assert_eq!(results.len(), task.requests.len());
    let mut per_item: Vec<ItemScore> = task
        .items
        .iter()
        .map(|it| ItemScore {
            lls: vec![0.0; it.choices.len()],
            greedy: vec![false; it.choices.len()],
            acc: 0.0,
            acc_norm: 0.0,
        })
        .collect();
    for (r, &(ll, g)) in task.requests.iter().zip(results) {
        per_item[r.item].lls[r.choice] = ll;
        per_item[r.item].greedy[r.choice] = g;
    }
    let (mut acc, mut acc_norm, mut gold_ll, mut choice_nll) = (0.0, 0.0, 0.0, 0.0);
    for (it, s) in task.items.iter().zip(per_item.iter_mut()) {
        let pred = argmax(s.lls.iter().copied());
        let pred_norm = argmax(
            s.lls
                .iter()
                .zip(&it.choices)
                .map(|(ll, c)| ll / c.chars().count() as f64),
        );
        s.acc = f64::from(u8::from(pred == it.gold));
        s.acc_norm = f64::from(u8::from(pred_norm == it.gold));
        acc += s.acc;
        acc_norm += s.acc_norm;
        gold_ll += s.lls[it.gold];
        choice_nll += self::choice_nll(&s.lls, it.gold);
    }
    let n = task.items.len() as f64;
    TaskScore {
        name: task.name.clone(),
        items: task.items.len(),
        acc: acc / n,
        acc_norm: acc_norm / n,
        gold_ll: gold_ll / n,
        choice_nll: choice_nll / n,
        per_item,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equals() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0].into_iter()), 1);
        assert_eq!(argmax([-5.0, -7.0].into_iter()), 0);
        assert_eq!(argmax([-7.0, -5.0].into_iter()), 1);
    }

    #[test]
    fn bad_items_name_the_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        let cases = [
            (
                r#"{"context": "a", "choices": ["x", "y"], "gold": 2}"#,
                "line 1: `gold` is 2",
            ),
            (
                r#"{"context": "a", "choices": ["x"], "gold": 0}"#,
                "needs two or more",
            ),
            (
                r#"{"context": "", "choices": ["x", "y"], "gold": 0}"#,
                "`context` is empty",
            ),
            (
                r#"{"context": "a", "choices": ["x", ""], "gold": 0}"#,
                "choice 1 is empty",
            ),
            (
                r#"{"context": "a", "choice": ["x", "y"], "gold": 0}"#,
                "unknown field `choice`",
            ),
        ];
        for (line, want) in cases {
            std::fs::write(&p, format!("{line}\n")).unwrap();
            let e = load_items(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("t.jsonl"), "{line}: {e}");
        }
    }
}
