//! Scoring given points outside the search (the report's references) on every data set,
//! spread over the usable workers.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ckmerge_common::protocol::{context_with_timeout, EvalReply, EvalRequest};
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use super::slot::State;
use super::Scheduler;

impl Scheduler {
    /// Scores each point on every data set, spread over the usable workers (for the
    /// report). Not journaled: these are recomputed on a resume.
    pub async fn score_points(&mut self, points: &[Vec<f64>]) -> Result<Vec<EvalReply>> {
        let mut todo: VecDeque<usize> = (0..points.len()).collect();
        let mut out: Vec<Option<EvalReply>> = vec![None; points.len()];
        let mut running = FuturesUnordered::new();
        let mut busy = vec![false; self.slots.len()];
        // `deadline_s` is for one trial, which scores the objective only; these score every
        // data set, so the deadline grows with the tokens they add.
        let factor = self
            .slots
            .iter()
            .find_map(|s| s.report.as_ref())
            .map(|r| {
                let total: usize = r.datasets.iter().map(|d| d.tokens).sum();
                let objective = r.datasets.first().map_or(0, |d| d.tokens);
                if objective == 0 {
                    1.0
                } else {
                    (total as f64 / objective as f64).max(1.0)
                }
            })
            .unwrap_or(1.0);
        let deadline = Duration::from_secs_f64(self.cfg.workers.deadline_s * factor);
        loop {
            for (i, in_use) in busy.iter_mut().enumerate() {
                if todo.is_empty() {
                    break;
                }
                if *in_use || self.slots[i].state != State::Idle {
                    continue;
                }
                let k = todo.pop_front().expect("not empty");
                let client = self.slots[i]
                    .client
                    .clone()
                    .expect("idle workers are connected");
                let req = EvalRequest {
                    trial: u64::MAX - k as u64,
                    weights: self.opt.space.merge_weights(&points[k]),
                    all_datasets: true,
                    // Under early stopping: scored whole, with the objective's per-batch
                    // sums, so that trials can race against the best of them.
                    race: self
                        .cfg
                        .search
                        .early_stop
                        .then(|| ckmerge_common::race::Race::whole(self.objective().weights())),
                };
                *in_use = true;
                running.push(async move {
                    let r = client.evaluate(context_with_timeout(deadline), req).await;
                    (i, k, r)
                });
            }
            let Some((i, k, r)) = running.next().await else {
                if todo.is_empty() {
                    break;
                }
                // Nothing running and no idle worker: on a resume of a finished run no
                // worker has connected yet, and a lost one may come back. Drive the
                // connections until one is ready, or fail as a search does when none can.
                self.on_tick();
                self.check_workers()
                    .context("no worker left to score the report's reference points")?;
                tokio::select! {
                    Some(ev) = self.rx.recv() => self.handle(ev)?,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                busy.resize(self.slots.len(), false);
                continue;
            };
            busy[i] = false;
            match r {
                Ok(Ok(reply)) => out[k] = Some(reply),
                Ok(Err(e)) => bail!("scoring weights {:?} for the report: {e}", points[k]),
                Err(e) => {
                    self.lose(i, e.to_string());
                    todo.push_front(k);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every point scored"))
            .collect())
    }
}
