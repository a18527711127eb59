//! Linting build configurations: Dockerfiles, compose files, bake files and GitHub
//! workflow files, checked for the mistakes that silently lose the build cache.
//!
//! [`lint_paths`] walks the given paths, parses every file it recognises (a file that does
//! not parse becomes a `parse-error` finding; the others are still checked), gathers the
//! builds they define wherever they are defined (a `docker build` in a `run:` step,
//! `docker/build-push-action`, a compose service, a bake target), and runs the rules:
//! per file (Dockerfile layers and context, compose `x-bake`, workflow matrices and
//! bake-action sources) and across files (who exports the cache another build imports).
//! Pure: reads files, never the network.

mod bake;
mod cache;
mod compose;
mod dockerfile;
mod expression;
mod files;
mod finding;
mod render;
mod workflow;
mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use self::finding::{Finding, Level, Rule};

use self::bake::Bake;
use self::cache::Build;
use self::files::Kind;

/// What a lint found, and in which files.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Every finding, sorted by file, line and rule.
    pub findings: Vec<Finding>,
    /// The files that were read, as displayed.
    pub files: Vec<String>,
}

impl Report {
    /// Whether any finding is at `level` or above (the exit status of `layercache lint`).
    pub fn fails_at(&self, level: Level) -> bool {
        self.findings.iter().any(|f| f.level >= level)
    }

    /// One line per finding (`file:line: level rule: problem — fix`) and a summary.
    pub fn to_text(&self) -> String {
        render::text(self)
    }

    /// The findings as a JSON array of `{rule, level, file, line, message, fix}`.
    pub fn to_json(&self) -> String {
        render::json(self)
    }

    /// A SARIF 2.1.0 log, for GitHub code scanning.
    pub fn to_sarif(&self) -> String {
        render::sarif(self)
    }
}

/// One file, parsed.
enum Parsed {
    Dockerfile {
        path: PathBuf,
        file: String,
        dockerfile: dockerfile::parse::Dockerfile,
    },
    Compose {
        path: PathBuf,
        compose: compose::Compose,
    },
    Bake {
        path: PathBuf,
        bake: Bake,
    },
    Workflow(workflow::Workflow),
}

/// What to leave out of a lint.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Globs (`.gitignore` syntax, relative to each directory given) never linted, on top
    /// of `.gitignore`, vendored trees, test fixtures and a `.layercache-lint.toml`'s
    /// `exclude`.
    pub exclude: Vec<String>,
}

/// Lints the files under `paths` with the default [`Options`].
pub fn lint_paths<P: AsRef<Path>>(paths: &[P]) -> Report {
    lint(paths, &Options::default())
}

/// Lints the files under `paths`: directories are walked (see [`Options`]), files are
/// taken as given, and each repository found is checked on its own.
pub fn lint<P: AsRef<Path>>(paths: &[P], options: &Options) -> Report {
    let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
    let discovered = files::discover(&paths, &options.exclude);
    let mut report = Report::default();
    let mut findings = discovered.findings;
    let mut scopes: BTreeMap<PathBuf, Vec<Parsed>> = BTreeMap::new();
    for found in discovered.files {
        let path = found.path;
        let file = files::display(&path);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                findings.push(Finding::new(
                    Rule::ParseError,
                    &file,
                    1,
                    format!("cannot read it: {error}"),
                    "check the file's permissions and that it is UTF-8 text",
                ));
                report.files.push(file);
                continue;
            }
        };
        let Some(kind) = resolve_kind(&path, found.kind, &text) else {
            continue;
        };
        report.files.push(file.clone());
        match parse(&path, &file, kind, &text) {
            Ok(p) => {
                if let Parsed::Workflow(workflow) = &p {
                    report.files.extend(workflow.scripts.iter().cloned());
                }
                scopes.entry(found.scope).or_default().push(p);
            }
            Err(finding) => findings.push(finding),
        }
    }
    for (scope, parsed) in &scopes {
        findings.extend(check(parsed, std::slice::from_ref(scope)));
    }
    findings.sort_by(|a, b| {
        (&a.file, a.line, a.rule, &a.message).cmp(&(&b.file, b.line, b.rule, &b.message))
    });
    findings.dedup();
    report.files.sort();
    report.files.dedup();
    report.findings = findings;
    report
}

/// What a file is, once its content is known (`None`: not a file to lint).
fn resolve_kind(path: &Path, kind: Kind, text: &str) -> Option<Kind> {
    match kind {
        Kind::MaybeBakeHcl => bake::looks_like_bake(text).then_some(Kind::BakeHcl),
        Kind::MaybeCompose => yaml::parse(text)
            .is_ok_and(|doc| doc.get("services").is_some_and(yaml::Node::is_map))
            .then_some(Kind::Compose),
        Kind::Unknown => {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if name.ends_with(".hcl") {
                Some(Kind::BakeHcl)
            } else if name.ends_with(".json") {
                Some(Kind::BakeJson)
            } else if name.ends_with(".yml") || name.ends_with(".yaml") {
                match yaml::parse(text) {
                    Ok(doc) if doc.get("jobs").is_some() => Some(Kind::Workflow),
                    Ok(doc) if doc.get("services").is_some() => Some(Kind::Compose),
                    Ok(_) => None,
                    Err(_) => Some(Kind::Compose),
                }
            } else {
                Some(Kind::Dockerfile)
            }
        }
        other => Some(other),
    }
}

fn parse_error(file: &str, line: usize, what: &str, message: &str) -> Finding {
    Finding::new(
        Rule::ParseError,
        file,
        line,
        format!("not valid {what}: {message}"),
        "fix the syntax at this line; the file was not checked further",
    )
}

fn parse(path: &Path, file: &str, kind: Kind, text: &str) -> Result<Parsed, Finding> {
    let path = path.to_path_buf();
    match kind {
        Kind::Dockerfile => dockerfile::parse(text)
            .map(|dockerfile| Parsed::Dockerfile {
                path,
                file: file.to_owned(),
                dockerfile,
            })
            .map_err(|e| parse_error(file, e.line, "Dockerfile syntax", &e.message)),
        Kind::Compose => {
            let root =
                yaml::parse(text).map_err(|e| parse_error(file, e.line, "YAML", &e.message))?;
            let compose = compose::read(file, &path, &root);
            Ok(Parsed::Compose { path, compose })
        }
        Kind::BakeHcl | Kind::MaybeBakeHcl => bake::read_hcl(file, &path, text)
            .map(|bake| Parsed::Bake { path, bake })
            .map_err(|e| parse_error(file, e.line, "HCL", &e.message)),
        Kind::BakeJson => bake::read_json(file, &path, text)
            .map(|bake| Parsed::Bake { path, bake })
            .map_err(|e| parse_error(file, e.line, "JSON", &e.message)),
        Kind::Workflow => {
            let root =
                yaml::parse(text).map_err(|e| parse_error(file, e.line, "YAML", &e.message))?;
            Ok(Parsed::Workflow(workflow::read(file, &path, &root)))
        }
        Kind::MaybeCompose | Kind::Unknown => {
            Err(parse_error(file, 1, "input", "unknown kind of file"))
        }
    }
}

/// Every rule over the parsed files.
fn check(parsed: &[Parsed], roots: &[PathBuf]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut builds: Vec<Build> = Vec::new();
    let mut unseen = cache::Unseen::default();
    // The compose and bake files read, for bake steps.
    let mut bake_files: HashMap<PathBuf, Bake> = HashMap::new();
    for p in parsed {
        match p {
            Parsed::Compose { path, compose } => {
                findings.extend(compose.findings.iter().cloned());
                builds.extend(compose.builds.iter().cloned());
                bake_files.insert(path.clone(), compose.as_bake());
            }
            Parsed::Bake { path, bake } => {
                builds.extend(bake.targets.iter().cloned());
                bake_files.insert(path.clone(), bake.clone());
            }
            Parsed::Workflow(workflow) => {
                findings.extend(workflow.findings.iter().cloned());
                builds.extend(workflow.builds.iter().cloned());
                unseen.builder |= workflow.unseen_builder;
                unseen.mentions.extend(workflow.mentions.iter().cloned());
            }
            Parsed::Dockerfile { .. } => {}
        }
    }
    let bake_file = |path: &Path| -> Option<Bake> {
        let path = files::normalize(path);
        if let Some(bake) = bake_files.get(&path) {
            return Some(bake.clone());
        }
        // A file outside the scan (or excluded from it) that a step still reads.
        let text = std::fs::read_to_string(&path).ok()?;
        let file = files::display(&path);
        match files::classify(&path)? {
            Kind::BakeHcl | Kind::MaybeBakeHcl => bake::read_hcl(&file, &path, &text).ok(),
            Kind::BakeJson => bake::read_json(&file, &path, &text).ok(),
            Kind::Compose | Kind::MaybeCompose => {
                let root = yaml::parse(&text).ok()?;
                Some(compose::read(&file, &path, &root).as_bake())
            }
            _ => None,
        }
    };
    let workflows: Vec<&workflow::Workflow> = parsed
        .iter()
        .filter_map(|p| match p {
            Parsed::Workflow(w) => Some(w),
            _ => None,
        })
        .collect();
    for called in &workflows {
        let callers: Vec<(&str, &workflow::Call)> = workflows
            .iter()
            .flat_map(|w| w.calls.iter().map(move |c| (w.file.as_str(), c)))
            .filter(|(_, c)| c.path == called.path)
            .collect();
        findings.extend(workflow::matrix_findings(called, &callers));
    }
    // `docker compose build` builds each service's Dockerfile with its own arguments.
    let mut dockerfile_builds = builds.clone();
    for p in parsed {
        if let Parsed::Workflow(workflow) = p {
            for step in &workflow.bake_steps {
                findings.extend(step.check(&bake_file));
            }
            for run in &workflow.compose_builds {
                let (run_builds, run_findings) = run.builds(&bake_file);
                dockerfile_builds.extend(run_builds);
                findings.extend(run_findings);
            }
        }
    }
    // Each build's Dockerfile as the file it really is (a symlink names its target); a
    // name computed per job (`Dockerfile.${{ matrix.flavor }}`) stands for each file it
    // may be.
    let real = |path: &Path| {
        path.canonicalize()
            .ok()
            .or_else(|| Some(path.parent()?.canonicalize().ok()?.join(path.file_name()?)))
            .unwrap_or_else(|| path.to_path_buf())
    };
    let built: Vec<(PathBuf, &Build)> = dockerfile_builds
        .iter()
        .filter_map(|b| Some((real(b.dockerfile.as_deref()?), b)))
        .collect();
    for p in parsed {
        if let Parsed::Dockerfile {
            path,
            file,
            dockerfile,
        } = p
        {
            let path_real = real(path);
            let uses = dockerfile::Uses {
                builds: built
                    .iter()
                    .filter(|(d, _)| *d == path_real || cache::may_be_path(d, &path_real))
                    .map(|(_, b)| *b)
                    .collect(),
                roots,
            };
            findings.extend(dockerfile::check(file, path, dockerfile, &uses));
        }
    }
    findings.extend(cache::check(&builds, unseen));
    findings
}
