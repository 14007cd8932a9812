//! What a running search shows: a live line on a terminal (trials done and in flight,
//! best so far, ETA), one structured log line per trial otherwise (batch jobs, CI).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct View {
    pub done: usize,
    pub max: usize,
    pub in_flight: usize,
    pub workers: usize,
    /// (perplexity, weights) of the best trial.
    pub best: Option<(f64, Vec<f64>)>,
    pub mean_eval_seconds: Option<f64>,
}

pub struct ProgressView {
    bar: Option<ProgressBar>,
}

fn fmt_weights(w: &[f64]) -> String {
    let parts: Vec<String> = w.iter().map(|x| format!("{x:.3}")).collect();
    format!("[{}]", parts.join(", "))
}

impl ProgressView {
    /// A live display when stderr is a terminal and `live` is asked for.
    pub fn new(live: bool) -> ProgressView {
        let bar = (live && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} trials  {msg}")
                    .expect("valid template"),
            );
            b
        });
        ProgressView { bar }
    }

    pub fn update(&self, v: &View) {
        let Some(b) = &self.bar else { return };
        b.set_length(v.max as u64);
        b.set_position(v.done.min(v.max) as u64);
        let best = match &v.best {
            Some((p, w)) => format!("best ppl {p:.4} at {}", fmt_weights(w)),
            None => "no result yet".into(),
        };
        let eta = match v.mean_eval_seconds {
            Some(s) if v.workers > 0 => {
                let left = v.max.saturating_sub(v.done) as f64;
                format!("  eta {:.0} s", left * s / v.workers as f64)
            }
            _ => String::new(),
        };
        b.set_message(format!(
            "{} in flight on {} worker{}  {best}{eta}",
            v.in_flight,
            v.workers,
            if v.workers == 1 { "" } else { "s" }
        ));
    }

    pub fn trial_done(&self, trial: u64, worker: &str, weights: &[f64], ppl: f64, nll: f64) {
        let line = format!(
            "trial {trial} on {worker}: weights {} perplexity {ppl:.4} (mean NLL {nll:.6})",
            fmt_weights(weights)
        );
        match &self.bar {
            Some(b) => b.println(line),
            // Key=value fields, so batch logs can be parsed.
            None => tracing::info!(
                trial,
                worker,
                weights = %fmt_weights(weights),
                perplexity = ppl,
                mean_nll = nll,
                "trial done"
            ),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
