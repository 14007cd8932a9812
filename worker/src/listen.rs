//! `ckmerge worker`: bind, work out the address the coordinator should use, announce it,
//! and serve until a coordinator asks for shutdown.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ckmerge_common::protocol::Secret;

use crate::serve::{serve_tcp, WorkerService};

/// How a TCP worker is started (`ckmerge worker`'s flags).
pub struct ListenOptions {
    /// `host:port` to bind (port 0: any free port).
    pub listen: String,
    /// Host name or IP to announce instead of the bound IP (needed for 0.0.0.0).
    pub advertise: Option<String>,
    /// File to append the announced `host:port` to, for `workers.addresses_file`.
    pub announce: Option<PathBuf>,
    pub secret: Secret,
    /// Resolved `--gpus` (None: the CPU).
    pub gpus: Option<Vec<usize>>,
    /// `--gpus auto`: work whose GPU path has not yet run on a GPU stays on the CPU.
    pub gpus_auto: bool,
    /// Benchmark mode: every evaluation sleeps this long and scores a fixed function.
    pub fixed_cost: Option<Duration>,
}

/// The address to announce: `advertise` if given, else the bound IP, which must then be
/// a specific interface (a coordinator cannot connect to 0.0.0.0).
fn announced_host(opts: &ListenOptions, bound: std::net::SocketAddr) -> Result<String> {
    match &opts.advertise {
        Some(h) if h.trim().is_empty() => {
            bail!("--advertise is empty: give a host name or IP the coordinator can reach")
        }
        Some(h) => Ok(h.clone()),
        None if bound.ip().is_unspecified() => bail!(
            "--listen {} accepts on every interface: pass --advertise HOST so the coordinator knows where to connect",
            opts.listen
        ),
        None => Ok(bound.ip().to_string()),
    }
}

/// Runs a worker on its own runtime until a coordinator asks it to shut down. Prints
/// `ckmerge worker listening on HOST:PORT` on stdout once it accepts connections.
pub fn run(opts: ListenOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&opts.listen)
            .await
            .with_context(|| format!("listening on {}", opts.listen))?;
        let bound = listener.local_addr()?;
        let addr = format!("{}:{}", announced_host(&opts, bound)?, bound.port());
        println!("ckmerge worker listening on {addr}");
        if let Some(f) = &opts.announce {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .with_context(|| format!("opening {}", f.display()))?;
            file.write_all(format!("{addr}\n").as_bytes())
                .and_then(|_| file.sync_data())
                .with_context(|| format!("announcing in {}", f.display()))?;
        }
        let mut svc =
            WorkerService::with_options(opts.fixed_cost, Some(opts.secret.clone()), opts.gpus);
        if opts.gpus_auto {
            svc = svc.gpus_chosen_automatically();
        }
        serve_tcp(listener, opts.secret, svc).await;
        tracing::info!("worker {addr} shut down");
        Ok(())
    })
}
