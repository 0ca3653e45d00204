//! `hub serve`.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Use this external broker (`mqtt://host:port`) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<String>,
    /// Limit blob uploads to devices to this many bytes per second (default: hub.toml's
    /// `upload_rate`, 0 = unlimited).
    #[arg(long)]
    upload_rate: Option<u64>,
    /// Serve every blob request itself instead of pointing devices at peers that have
    /// the chunk (the hub-only baseline of the fleet benchmark).
    #[arg(long)]
    no_redirect: bool,
    /// Serve the fleet dashboard and its JSON API on this address (e.g.
    /// 127.0.0.1:8080; default: hub.toml's `http`, off). Reading is open to whoever
    /// reaches the address; pausing, halting and resuming need the token in
    /// keys/http.token.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args {
        broker,
        metrics,
        upload_rate,
        no_redirect,
        http,
    } = args;
    init_tracing();
    let mut home = Home::open(dir)?;
    // A home made by an older hub published from a post-receive hook, after the branch
    // had moved: its pushes get this hub's pre-receive hook.
    if let Err(e) = hub::deploy::install_hook(&home.dir) {
        tracing::warn!("deploy repository hook not updated: {}", proto::Chain(&e));
    }
    if let Some(rate) = upload_rate {
        home.config.upload_rate = rate;
    }
    if no_redirect {
        home.config.redirect = false;
    }
    if broker.is_some() {
        home.config.broker = broker;
    }
    if metrics.is_some() {
        home.config.metrics = metrics;
    }
    if http.is_some() {
        home.config.http = http;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(hub::serve::serve(home, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }))?;
    Ok(())
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn,libp2p_gossipsub=error,rumqttd=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
