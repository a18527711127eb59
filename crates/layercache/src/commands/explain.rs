//! `layercache explain`.

use clap::Args;

/// Options of `layercache explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {}

/// Run `layercache explain`.
pub async fn run(_args: ExplainArgs) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
