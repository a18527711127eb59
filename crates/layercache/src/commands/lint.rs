//! `layercache lint`.

use clap::Args;

/// Options of `layercache lint`.
#[derive(Debug, Args)]
pub struct LintArgs {}

/// Run `layercache lint`.
pub fn run(_args: LintArgs) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
