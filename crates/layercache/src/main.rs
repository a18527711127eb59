//! The `layercache` binary: configuration, logging, and the subcommands.

mod cli;
mod commands;
mod config;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use crate::cli::{Cli, Command, ServeArgs};
use crate::config::Config;

/// Run the command; an error is printed as one chain of causes, never with a backtrace.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Gc(args) => runtime.block_on(commands::gc::run(args)),
        Command::Report(args) => runtime.block_on(commands::report::run(args)),
        Command::Audit(args) => runtime.block_on(commands::audit::run(args)),
        Command::Expect(args) => runtime.block_on(commands::expect::run(args)),
        Command::Token(args) => commands::token::run(args),
        Command::Tls(args) => match args.command {
            cli::TlsCommand::Init(args) => commands::tls::init(args),
        },
        Command::Explain(args) => runtime.block_on(commands::explain::run(args)),
        Command::Lint(args) => commands::lint::run(args),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    if args.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    if let Some(refusal) = config.server.auth.refusal(config.server.listen) {
        anyhow::bail!("{refusal}");
    }
    if config.server.auth.mode == Some(server::auth::Mode::Open)
        && !config.server.listen.ip().is_loopback()
    {
        tracing::warn!(
            listen = %config.server.listen,
            "serving without authentication: anyone who reaches the port can push, overwrite and delete"
        );
    }
    let store = store::Store::open(&config.store).await.with_context(|| {
        format!(
            "opening the store (data directory {}, blobs in {}, metadata in {})",
            config.store.data_dir.display(),
            config.store.blobs,
            config.store.meta
        )
    })?;
    let tls = match &config.server.tls {
        Some(tls) => Some(server::tls::Tls::load(tls).context("loading the TLS certificate")?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("listening on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        %addr,
        scheme,
        data_dir = %config.store.data_dir.display(),
        blobs = %config.store.blobs,
        metadata = %config.store.meta,
        "layercache serving"
    );
    println!("layercache listening on {scheme}://{addr}");
    if let Some(tls) = &tls {
        reload_on_hangup(tls.clone());
    }
    let auth = &config.server.auth;
    let oidc = Arc::new(
        server::auth::oidc::Oidc::load(&auth.issuers, &auth.rules)
            .await
            .context("loading the CI identity token issuers")?,
    );
    let actions = server::actions::Actions::open(
        config.actions.clone(),
        &config.store.data_dir,
        Arc::clone(&oidc),
    )
    .await
    .context("starting the Actions cache service")?;
    let key_path = config.actions.key_path(&config.store.data_dir);
    let key = server::actions::token::load_or_create_key(&key_path)
        .with_context(|| format!("reading the signing key {}", key_path.display()))?;
    let audit_config = &config.server.audit;
    let audit =
        server::audit::Audit::open(audit_config, &config.store.data_dir).with_context(|| {
            let dir = audit_config.dir_in(&config.store.data_dir);
            format!("opening the audit log in {}", dir.display())
        })?;
    let authority = server::auth::Authority::new(auth.clone(), &key, oidc)
        .map_err(|e| anyhow::anyhow!("[server.auth]: {e}"))?;
    let upstreams =
        server::upstream::Upstreams::new(&config.upstreams, config.store.max_manifest_bytes)
            .map_err(|e| anyhow::anyhow!("[[upstreams]]: {e}"))?;
    let state = server::AppState::new(
        store.clone(),
        &config.server,
        actions,
        authority,
        audit,
        upstreams,
    );
    let app = server::build_router(state.clone());
    server::serve(
        listener,
        app,
        &config.server.limits,
        tls.as_ref(),
        shutdown_signal(),
    )
    .await;
    state.audit.flush().await;
    state.sessions.save(true).await?;
    store.flush_access_times().await?;
    Ok(())
}

/// Re-read the TLS certificate and key on every `SIGHUP` (they are also re-read when
/// their files change).
fn reload_on_hangup(tls: server::tls::Tls) {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tls.reload();
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "SIGHUP will not reload the TLS certificate"),
    }
    #[cfg(not(unix))]
    drop(tls);
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
