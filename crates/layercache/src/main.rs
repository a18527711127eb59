//! The `layercache` binary: configuration, logging, and the subcommands.

mod cli;
mod commands;
mod config;

use std::io::{BufWriter, IsTerminal};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, ServeArgs};
use crate::config::Config;

/// How long tasks still running after `serve` has saved its state may take to end.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// Most malloc arenas glibc may create (its default is eight per core).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 2;

/// Cap glibc's malloc arenas unless `MALLOC_ARENA_MAX` sets them. glibc gives a thread
/// that finds the arenas busy one of its own, up to eight per core, and keeps what is
/// freed in each: after a burst of requests on the runtime's and the blocking pool's
/// threads, every arena holds its high-water mark, and the next burst on other threads
/// adds more. Two arenas cut a run's peak memory by a fifth at the same request rates.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only sets an allocator parameter; this runs first in `main`,
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

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
    limit_malloc_arenas();
    let cli = Cli::parse();
    let _unwritten_log = init_logging(matches!(cli.command, Command::Serve(_)));
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let outcome = match cli.command {
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
        Command::Health(args) => runtime.block_on(commands::health::run(args)),
    };
    // Whatever still runs (a blocking write the drain cut off) gets a moment, not a
    // veto over the exit.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    outcome
}

/// Log to stderr at `RUST_LOG`'s levels, `info` by default. A server logs a line per
/// request: with `in_background`, lines are handed to a thread of their own that writes
/// them in batches, so a request does not wait for its line to be written; the returned
/// guard writes what is left when it is dropped.
fn init_logging(in_background: bool) -> Option<WorkerGuard> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal());
    if !in_background {
        logs.with_writer(std::io::stderr).init();
        return None;
    }
    // Not lossy: a full queue makes requests wait rather than lose their lines.
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(BufWriter::new(std::io::stderr()));
    logs.with_writer(writer).init();
    Some(guard)
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
    // Every check is done: only now is the port bound and the server said to be up.
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
    // The signal handlers are in place before anyone learns the server is up: a SIGTERM
    // or SIGHUP sent right after would otherwise end the process by default.
    let shutdown = shutdown_signal().context("installing the SIGTERM handler")?;
    reload_on_hangup(tls.clone(), args, config.clone());
    println!("layercache listening on {scheme}://{addr}");
    let drained = server::serve(
        listener,
        app,
        &config.server.limits,
        tls.as_ref(),
        shutdown,
        config.server.shutdown_timeout,
    )
    .await;
    // The requests are over: save what is only in memory. Each step runs even when one
    // before it failed.
    state.audit.flush().await;
    let sessions = state.sessions.save(true).await;
    let access_times = store.flush_access_times().await;
    for (what, outcome) in [
        ("build sessions", &sessions),
        ("access times", &access_times),
    ] {
        if let Err(e) = outcome {
            tracing::error!(error = %e, "saving the {what} at shutdown failed");
        }
    }
    sessions.context("saving the build sessions at shutdown")?;
    access_times.context("saving the access times at shutdown")?;
    tracing::info!(
        connections = drained.open,
        closed_unfinished = drained.cut,
        "layercache stopped: requests drained, build sessions and access times saved"
    );
    Ok(())
}

/// On every `SIGHUP`: re-read the TLS certificate and key (also re-read when their files
/// change), and load the configuration again as at start. The rest of the configuration
/// is fixed for the life of the process: a change to it is validated and logged as
/// waiting for a restart, and an invalid one is reported before that restart fails.
fn reload_on_hangup(tls: Option<server::tls::Tls>, args: ServeArgs, running: Config) {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    if let Some(tls) = &tls {
                        tls.reload();
                        tracing::info!("SIGHUP: TLS certificate and key re-read");
                    }
                    check_configuration(&args, &running);
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP will not reload the TLS certificate nor check the configuration")
        }
    }
    #[cfg(not(unix))]
    drop((tls, args, running));
}

/// Load the configuration again and say how it differs from the `running` one.
fn check_configuration(args: &ServeArgs, running: &Config) {
    let loaded = match Config::load(args) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!(
                error = %format_args!("{e:#}"),
                "SIGHUP: the configuration does not load; the running one stays, and a restart would fail"
            );
            return;
        }
    };
    let mut changed = Vec::new();
    if loaded.server.tls != running.server.tls {
        changed.push("server.tls (the certificate files' paths)");
    }
    let (mut server, mut serving) = (loaded.server.clone(), running.server.clone());
    (server.tls, serving.tls) = (None, None);
    if server != serving {
        changed.push("server");
    }
    if loaded.store != running.store {
        changed.push("store");
    }
    if loaded.actions != running.actions {
        changed.push("actions");
    }
    if loaded.upstreams != running.upstreams {
        changed.push("upstreams");
    }
    if changed.is_empty() {
        tracing::info!("SIGHUP: the configuration is unchanged");
    } else {
        tracing::warn!(
            sections = %changed.join(", "),
            "SIGHUP: the changed configuration is valid and takes effect at the next restart"
        );
    }
}

/// Completes at the first `SIGTERM` or Ctrl-C (`SIGINT`). The handlers are installed
/// when this is called, so a signal arriving before the future is polled is kept.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("interrupted (Ctrl-C): shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    })
}

/// Completes at the first Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
