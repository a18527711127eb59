//! `layercache lint`: check Dockerfiles, compose, bake and GitHub workflow files for the
//! mistakes that silently lose the build cache. The rules live in `diagnose::lint`; this
//! picks the output format and the exit status.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use diagnose::lint::{self, Level};

/// Options of `layercache lint`.
#[derive(Debug, Args)]
pub struct LintArgs {
    /// Files or directories to check; directories are walked for Dockerfiles, compose
    /// files, bake files and .github/workflows, honouring .gitignore and skipping vendored
    /// trees (vendor, node_modules, third_party) and test data (testdata, fixtures).
    /// Each repository found (a directory with .git or .github) is checked on its own.
    #[arg(value_name = "PATHS", default_value = ".")]
    pub paths: Vec<PathBuf>,
    /// How to print the findings.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Print the findings as JSON (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Leave out files matching GLOB (.gitignore syntax, relative to each directory
    /// given); repeatable. A `.layercache-lint.toml` with `exclude = ["GLOB", ...]` at a
    /// repository's root does the same.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Exit 1 when a finding at this level or above exists.
    #[arg(long, value_enum, default_value_t = Threshold::Error)]
    pub level: Threshold,
}

/// Output formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// One finding per line (`file:line: level rule: problem — fix`) and a summary.
    Text,
    /// A JSON array of findings (rule, level, file, line, message, fix).
    Json,
    /// SARIF 2.1.0, for GitHub code scanning.
    Sarif,
}

/// The lowest level that fails the run.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Threshold {
    /// Any finding fails.
    Info,
    /// Warnings and errors fail.
    Warning,
    /// Only errors fail.
    Error,
}

impl From<Threshold> for Level {
    fn from(threshold: Threshold) -> Level {
        match threshold {
            Threshold::Info => Level::Info,
            Threshold::Warning => Level::Warning,
            Threshold::Error => Level::Error,
        }
    }
}

/// Lints the paths and prints the report; exits 1 when a finding reaches `--level`, 2
/// when a path does not exist.
pub fn run(args: LintArgs) -> anyhow::Result<()> {
    if let Some(missing) = args.paths.iter().find(|p| !p.exists()) {
        eprintln!(
            "layercache lint: {}: no such file or directory",
            missing.display()
        );
        std::process::exit(2);
    }
    let options = lint::Options {
        exclude: args.exclude,
    };
    let report = lint::lint(&args.paths, &options);
    let format = if args.json { Format::Json } else { args.format };
    let output = match format {
        Format::Text => report.to_text(),
        Format::Json => report.to_json() + "\n",
        Format::Sarif => report.to_sarif() + "\n",
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the report")?;
    if report.fails_at(args.level.into()) {
        std::process::exit(1);
    }
    Ok(())
}
