//! `layercache health`: ask a running server's probe (`/readyz`, or `/healthz` with
//! `--live`) and exit by its answer, for a container's `HEALTHCHECK`, which has no other
//! HTTP client in an image holding only the binary.

use anyhow::Context;

use crate::cli::HealthArgs;

/// Exit 0 on `200`, an error (exit 1) on anything else or no answer.
pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let base = args.server.url.trim_end_matches('/');
    let path = if args.live {
        server::health::LIVE_PATH
    } else {
        server::health::READY_PATH
    };
    let url = reqwest::Url::parse(&format!("{base}{path}"))
        .with_context(|| format!("--server {base} is not a URL"))?;
    // The probe sends nothing and reads only a status, so on loopback (the server in the
    // same container) the certificate of a private CA need not verify.
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let client = reqwest::Client::builder()
        .timeout(*args.timeout)
        .danger_accept_invalid_certs(loopback)
        .build()
        .context("building the HTTP client")?;
    let response = client
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("reaching layercache at {url}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "{url} answered {status}: {}",
        body.trim()
    );
    println!("{}", body.trim());
    Ok(())
}
