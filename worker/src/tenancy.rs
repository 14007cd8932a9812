//! One search per worker. A TCP worker holds one loaded model and data set, so two
//! searches sharing it would score each other's trials on the wrong data (and the
//! first to finish would shut it down under the other). A search is identified by its
//! run (`LoadSpec::run`); the worker belongs to the run that loaded it for as long as a
//! connection of that run is open. A load from another run meanwhile is refused with a
//! message saying whose worker it is; evaluations, pipeline batches and shutdowns are
//! served only on connections of the run that holds it. Once every connection of the
//! holder has closed (its search ended or died), the next run may load.
//!
//! A later pipeline stage is loaded by its head worker, not by a coordinator: its load
//! takes the worker over (`takeover`), since the head, which a coordinator loads, is
//! where two searches are told apart; the pipeline of a search whose stage was taken is
//! refused its next batch on that stage (a clear error, never another search's scores).
//!
//! In-process workers belong to their search alone and have no connections to check.

use std::sync::Mutex;

/// Which run holds the worker, and through how many open connections.
#[derive(Default)]
pub struct Tenancy {
    holder: Mutex<Option<Holder>>,
}

struct Holder {
    run: String,
    peer: String,
    conns: usize,
}

/// One TCP connection: its peer, and the run it loaded for (once it has).
pub struct Conn {
    peer: String,
    run: Mutex<Option<String>>,
}

impl Conn {
    pub fn new(peer: impl Into<String>) -> Conn {
        Conn {
            peer: peer.into(),
            run: Mutex::new(None),
        }
    }
}

impl Tenancy {
    /// `conn` loads for `run`: granted when no other run holds the worker through an open
    /// connection, or with `takeover` (a pipeline stage loaded by its head).
    pub fn claim(&self, conn: &Conn, run: &str, takeover: bool) -> Result<(), String> {
        let mut h = self.holder.lock().expect("tenancy lock");
        let mut mine = conn.run.lock().expect("connection lock");
        match h.as_mut() {
            Some(holder) if holder.run != run && holder.conns > 0 && !takeover => {
                return Err(format!(
                    "this worker serves another search ({}, connected from {}); a worker serves one search at a time: start workers for this search, or wait until that one ends",
                    holder.run, holder.peer
                ))
            }
            Some(holder) if holder.run == run => {
                if mine.as_deref() != Some(run) {
                    holder.conns += 1;
                }
            }
            _ => {
                *h = Some(Holder {
                    run: run.to_string(),
                    peer: conn.peer.clone(),
                    conns: 1,
                })
            }
        }
        *mine = Some(run.to_string());
        Ok(())
    }

    /// Whether `conn` may use what is loaded: it loaded it, for the run holding it.
    pub fn check(&self, conn: &Conn) -> Result<(), String> {
        let h = self.holder.lock().expect("tenancy lock");
        let mine = conn.run.lock().expect("connection lock");
        match (h.as_ref(), mine.as_deref()) {
            (Some(holder), Some(run)) if holder.run == run => Ok(()),
            (Some(holder), _) => Err(format!(
                "this worker holds the model of another search ({}); load first (a worker serves one search at a time)",
                holder.run
            )),
            (None, _) => Err("nothing is loaded on this connection; load first".into()),
        }
    }

    /// `conn` closed.
    pub fn release(&self, conn: &Conn) {
        let mut h = self.holder.lock().expect("tenancy lock");
        let mine = conn.run.lock().expect("connection lock");
        if let (Some(holder), Some(run)) = (h.as_mut(), mine.as_deref()) {
            if holder.run == run {
                holder.conns = holder.conns.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_serves_the_run_that_loaded_it_until_its_connections_close() {
        let t = Tenancy::default();
        let (a1, a2, b) = (Conn::new("a:1"), Conn::new("a:2"), Conn::new("b:1"));
        t.claim(&a1, "host:/runs/a", false).unwrap();
        t.check(&a1).unwrap();
        // Another run is refused while run a holds the worker, and may not use it.
        let e = t.claim(&b, "host:/runs/b", false).unwrap_err();
        assert!(
            e.contains("another search (host:/runs/a, connected from a:1)"),
            "{e}"
        );
        assert!(t.check(&b).is_err());
        // Run a reconnects (a lost connection not yet noticed): granted.
        t.claim(&a2, "host:/runs/a", false).unwrap();
        t.claim(&a2, "host:/runs/a", false).unwrap(); // a reload on the same connection
        t.release(&a1);
        assert!(
            t.claim(&b, "host:/runs/b", false).is_err(),
            "a2 is still open"
        );
        t.release(&a2);
        // Every connection of run a closed: run b may load, and a's old ones may not use it.
        t.claim(&b, "host:/runs/b", false).unwrap();
        t.check(&b).unwrap();
        assert!(t.check(&a2).is_err());
        assert!(
            t.check(&Conn::new("c:1")).is_err(),
            "a connection that never loaded"
        );
    }
}
