//! Builds as the cache sees them, whatever file they come from (a `docker build` in a
//! workflow step, `docker/build-push-action`, a compose service, a bake target): what each
//! imports and exports, and the rules that look across all of them
//! (`cache-from-without-metadata`, `cache-write-never-read`, `no-cache-with-export`,
//! `gha-cache-heavy`, `uncompressed-choice`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::expression;
use super::finding::{Finding, Level, Rule};

/// A value and the line it was written on.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct At<T> {
    /// The value.
    pub value: T,
    /// Its line (1-based) in the build's file.
    pub line: usize,
}

/// Where a cache lives, as `--cache-from` / `--cache-to` name it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum CacheKind {
    /// `type=registry,ref=REF`, or a bare image reference.
    Registry(String),
    /// `type=inline`: the metadata rides in the image itself.
    Inline,
    /// `type=gha` with its scope (default `buildkit`).
    Gha(String),
    /// `type=local` with its directory (`dest` to export, `src` to import).
    Local(String),
    /// Any other type (s3, azblob, ...), not followed.
    Other(String),
    /// Computed at run time (`${{ inputs.cache }}`, an expression not followed): it may
    /// be any cache.
    Unknown,
}

/// One `--cache-from` or `--cache-to` value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CacheSpec {
    /// Where the cache lives.
    pub kind: CacheKind,
    /// Every `key=value`, as written.
    pub attrs: Vec<(String, String)>,
    /// The value as written.
    pub text: String,
    /// Written under a compose service's `x-bake`, which compose's own bake path drops:
    /// it still pairs exports with imports, but `compose-xbake-dropped` is all there is
    /// to say about it.
    pub dropped: bool,
}

impl CacheSpec {
    /// Parses `type=registry,ref=r,mode=max` or a bare `image:tag`.
    pub fn parse(text: &str) -> CacheSpec {
        let written = text.trim();
        let Some(text) = expression::evaluate(written).filter(|t| !is_unknown(t)) else {
            return CacheSpec {
                kind: CacheKind::Unknown,
                attrs: Vec::new(),
                text: written.to_owned(),
                dropped: false,
            };
        };
        let attrs: Vec<(String, String)> = if text.contains('=') {
            split_csv(&text)
                .into_iter()
                .filter_map(|field| {
                    field
                        .split_once('=')
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                })
                .collect()
        } else {
            Vec::new()
        };
        let attr = |key: &str| attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let kind = if attrs.is_empty() {
            CacheKind::Registry(text.clone())
        } else {
            match attr("type").as_deref() {
                Some("registry") | None => match attr("ref") {
                    Some(r) => CacheKind::Registry(r),
                    None => CacheKind::Other(String::new()),
                },
                Some("inline") => CacheKind::Inline,
                Some("gha") => CacheKind::Gha(attr("scope").unwrap_or_else(|| "buildkit".into())),
                Some("local") => {
                    CacheKind::Local(attr("dest").or_else(|| attr("src")).unwrap_or_default())
                }
                Some(other) => CacheKind::Other(other.to_owned()),
            }
        };
        CacheSpec {
            kind,
            attrs,
            text,
            dropped: false,
        }
    }

    /// The value of `key`, if given.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// An equivalent spec given as a list of `key=value` pairs (bake's object form).
    pub fn from_pairs(pairs: &[(String, String)]) -> CacheSpec {
        let text = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        CacheSpec::parse(&text)
    }
}

/// A build argument (`--build-arg NAME=VALUE`) and its line.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BuildArg {
    /// The argument's name.
    pub name: String,
    /// Its value as written (possibly an expression).
    pub value: String,
    /// The line it is passed on.
    pub line: usize,
}

/// One build: where it is defined and what it reads and writes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Build {
    /// The file that defines it (as displayed).
    pub file: String,
    /// The line that starts it.
    pub line: usize,
    /// What it is, for messages: "`docker build`", "compose service `web`", ...
    pub what: String,
    /// The workflow job that runs it, for a build in a workflow.
    pub job: Option<String>,
    /// `--cache-from` values.
    pub cache_from: Vec<At<CacheSpec>>,
    /// `--cache-to` values.
    pub cache_to: Vec<At<CacheSpec>>,
    /// The line of `--no-cache`, when given.
    pub no_cache: Option<usize>,
    /// Build arguments.
    pub build_args: Vec<BuildArg>,
    /// The images it produces (`-t`, `tags:`, compose `image:`, an image output's name).
    pub tags: Vec<String>,
    /// The build context on disk, when it is a local directory.
    pub context: Option<PathBuf>,
    /// The Dockerfile on disk, when known.
    pub dockerfile: Option<PathBuf>,
    /// The Dockerfile stage it builds (`--target`), when given.
    pub target: Option<String>,
    /// Whether a job matrix varies what it builds (an input names `matrix.`) while
    /// every matrix job runs it.
    pub varies_by_matrix: bool,
    /// A bake target other targets inherit from: a template, not an image of its own.
    pub template: bool,
    /// An `mv` of one local cache directory onto another (the rotation that keeps a
    /// `type=local` cache from growing), not a build.
    pub moves_cache: bool,
    /// A word of the command is wholly computed (`$ARGS`, `"$@"`): it may hold any
    /// option, a cache import or export among them.
    pub opaque_options: bool,
}

impl Build {
    /// Whether the image carries its own cache metadata (inline cache).
    pub fn inline_cache(&self) -> bool {
        self.build_args.iter().any(|a| {
            a.name == "BUILDKIT_INLINE_CACHE" && matches!(a.value.trim(), "1" | "true" | "True")
        }) || self
            .cache_to
            .iter()
            .any(|c| c.value.kind == CacheKind::Inline)
    }

    /// The cache exports it really makes (not those compose drops), as written.
    pub fn exports(&self) -> Vec<&str> {
        self.cache_to
            .iter()
            .filter(|c| !c.value.dropped)
            .map(|c| c.value.text.as_str())
            .collect()
    }

    fn place(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// What a repository does with caches outside the builds the lint reads.
#[derive(Debug, Default)]
pub(crate) struct Unseen {
    /// A step the lint does not read may build (and so import or export anything).
    pub builder: bool,
    /// Text of commands, `env:` values and action inputs the lint does not follow.
    pub mentions: Vec<String>,
}

impl Unseen {
    /// Whether a cache may be read or written where the lint cannot see: an unseen
    /// builder, or its ref, scope or directory named in a command or input not followed.
    fn may_use(&self, spec: &CacheSpec) -> bool {
        if self.builder {
            return true;
        }
        let tokens = || {
            self.mentions.iter().flat_map(|m| {
                m.split(|c: char| c.is_whitespace() || matches!(c, ',' | '"' | '\'' | ';'))
                    .map(|t| t.rsplit_once('=').map_or(t, |(_, v)| v))
                    .filter(|t| !t.is_empty())
            })
        };
        match &spec.kind {
            CacheKind::Registry(reference) => tokens().any(|t| refs_match(t, reference)),
            CacheKind::Gha(scope) => self.mentions.iter().any(|m| {
                m.contains(&format!("scope={scope}"))
                    || (scope == "buildkit" && m.contains("type=gha"))
            }),
            CacheKind::Local(dir) => {
                let dir = dir.trim_end_matches('/');
                tokens().any(|t| patterns_meet(t.trim_end_matches('/'), dir))
            }
            CacheKind::Inline | CacheKind::Other(_) | CacheKind::Unknown => true,
        }
    }
}

/// The cross-file cache rules over every build of one repository.
pub(crate) fn check(builds: &[Build], mut unseen: Unseen) -> Vec<Finding> {
    // A cache computed at run time may be the one any import or export pairs with.
    unseen.builder |= builds
        .iter()
        .flat_map(|b| b.cache_from.iter().chain(&b.cache_to))
        .any(|c| c.value.kind == CacheKind::Unknown)
        || builds.iter().any(|b| b.opaque_options);
    let unseen = &unseen;
    let mut findings = Vec::new();
    for build in builds {
        for from in build.cache_from.iter().filter(|c| !c.value.dropped) {
            findings.extend(check_import(build, from, builds, unseen));
        }
        for to in build.cache_to.iter().filter(|c| !c.value.dropped) {
            findings.extend(check_export(build, to, builds, unseen));
        }
        if let Some(line) = build.no_cache {
            let exports = build.exports();
            if !exports.is_empty() || build.inline_cache() {
                let what = if exports.is_empty() {
                    "inline cache (BUILDKIT_INLINE_CACHE=1)".to_owned()
                } else {
                    format!("cache ({})", exports.join(", "))
                };
                findings.push(no_cache_finding(&build.file, line, &build.what, &what));
            }
        }
    }
    findings.extend(gha_scope_shared(builds));
    findings
}

/// The literal `type=gha` scopes a build exports to, with their lines.
fn gha_exports(build: &Build) -> impl Iterator<Item = (&str, usize)> {
    build.cache_to.iter().filter_map(|c| match &c.value.kind {
        CacheKind::Gha(scope) if !c.value.dropped && !scope.contains('$') => {
            Some((scope.as_str(), c.line))
        }
        _ => None,
    })
}

/// `gha-scope-shared`: in one file, different images (Dockerfile, context, stage)
/// exporting to one scope; or one build step whose matrix jobs build different images
/// into one scope.
fn gha_scope_shared(builds: &[Build]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut groups: BTreeMap<(&str, &str), Vec<(&Build, usize)>> = BTreeMap::new();
    for build in builds.iter().filter(|b| !b.template) {
        for (scope, line) in gha_exports(build) {
            if build.varies_by_matrix {
                findings.push(Finding::new(
                    Rule::GhaScopeShared,
                    &build.file,
                    line,
                    format!(
                        "{} builds a different image in each job of its matrix, and every job \
                         exports type=gha to the same scope `{scope}`: each job's export \
                         replaces the others', so only the last one's cache survives",
                        build.what
                    ),
                    "add the matrix value to the scope, e.g. \
                     scope=${{ matrix.image }} on both cache-from and cache-to",
                ));
            }
            groups
                .entry((build.file.as_str(), scope))
                .or_default()
                .push((build, line));
        }
    }
    for ((file, scope), exports) in groups {
        let mut images: Vec<(&PathBuf, Option<&PathBuf>, Option<&String>)> = Vec::new();
        let mut image_builds: Vec<&Build> = Vec::new();
        for (build, _) in &exports {
            let Some(dockerfile) = &build.dockerfile else {
                continue;
            };
            let image = (dockerfile, build.context.as_ref(), build.target.as_ref());
            if !images.contains(&image) {
                images.push(image);
                image_builds.push(build);
            }
        }
        if images.len() < 2 {
            continue;
        }
        let line = exports.first().map_or(1, |(_, line)| *line);
        findings.push(Finding::new(
            Rule::GhaScopeShared,
            file,
            line,
            format!(
                "{} export type=gha to the same scope `{scope}`: each export replaces the \
                 scope's cache, so only the image built last keeps its cache",
                name_builds(&image_builds)
            ),
            "give each image its own scope (scope=NAME on both cache-to and cache-from)",
        ));
    }
    findings
}

/// Builds named so that each is told apart, at most six of them: by job ("jobs `a` and
/// `b` (docker/build-push-action)"), or as what they are (bake targets, compose
/// services); a job or kind that several share adds each one's target or context.
fn name_builds(builds: &[&Build]) -> String {
    const SHOWN: usize = 6;
    let first_job = builds.first().and_then(|b| b.job.as_ref());
    let by_job = builds.iter().all(|b| b.job.is_some());
    let one_job = by_job && builds.iter().all(|b| b.job.as_ref() == first_job);
    let labels: Vec<String> = builds
        .iter()
        .map(|b| match &b.job {
            Some(job) if by_job => format!("`{job}`"),
            _ => b.what.clone(),
        })
        .collect();
    let mut names: Vec<String> = labels
        .iter()
        .zip(builds)
        .map(|(label, build)| {
            if labels.iter().filter(|l| *l == label).count() < 2 {
                return label.clone();
            }
            match image_detail(build) {
                Some(detail) if one_job => detail,
                Some(detail) => format!("{label} ({detail})"),
                None => label.clone(),
            }
        })
        .collect();
    if names.len() > SHOWN {
        let more = names.len() - SHOWN;
        names.truncate(SHOWN);
        names.push(format!("{more} more"));
    }
    let list = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.join(""),
    };
    if !by_job {
        return list;
    }
    let mut kinds: Vec<&str> = builds.iter().map(|b| b.what.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let kinds = kinds.join(", ");
    match first_job {
        Some(job) if one_job => format!("{list} in job `{job}` ({kinds})"),
        _ => format!("jobs {list} ({kinds})"),
    }
}

/// What tells one image of a Dockerfile from another: its target, else its context,
/// else its Dockerfile.
fn image_detail(build: &Build) -> Option<String> {
    match (&build.target, &build.context, &build.dockerfile) {
        (Some(target), _, _) => Some(format!("target `{target}`")),
        (None, Some(context), _) => Some(format!("context `{}`", super::files::display(context))),
        (None, None, Some(dockerfile)) => Some(format!("`{}`", super::files::display(dockerfile))),
        (None, None, None) => None,
    }
}

/// The `no-cache-with-export` finding: `what` runs with no-cache and exports `exported`.
pub(crate) fn no_cache_finding(file: &str, line: usize, what: &str, exported: &str) -> Finding {
    Finding::new(
        Rule::NoCacheWithExport,
        file,
        line,
        format!(
            "{what} runs with no-cache but exports {exported}: it rebuilds every step and \
             never reads the cache it writes"
        ),
        "drop no-cache so the build imports its own cache (use --no-cache-filter STAGE for \
         steps that must rerun), or drop the export",
    )
}

fn check_import(
    build: &Build,
    from: &At<CacheSpec>,
    builds: &[Build],
    unseen: &Unseen,
) -> Option<Finding> {
    match &from.value.kind {
        CacheKind::Registry(reference) => {
            if is_unknown(reference) {
                return None;
            }
            let exported = builds.iter().any(|b| {
                b.cache_to.iter().any(
                    |c| matches!(&c.value.kind, CacheKind::Registry(r) if refs_match(r, reference)),
                ) || (b.inline_cache() && b.tags.iter().any(|t| refs_match(t, reference)))
            });
            if exported {
                return None;
            }
            let producer = builds
                .iter()
                .find(|b| b.tags.iter().any(|t| may_produce(t, reference)));
            if producer.is_none() && unseen.builder {
                return None;
            }
            Some(match producer {
                Some(producer) => Finding::new(
                    Rule::CacheFromWithoutMetadata,
                    &build.file,
                    from.line,
                    format!(
                        "{} imports cache from `{reference}`, but that image is built by {} at \
                         {} without cache metadata (no BUILDKIT_INLINE_CACHE=1, no --cache-to \
                         type=inline): it is pulled, yet every step is rebuilt",
                        build.what,
                        producer.what,
                        producer.place()
                    ),
                    format!(
                        "build `{reference}` at {} with --build-arg BUILDKIT_INLINE_CACHE=1 (or \
                         --cache-to type=inline), or export a registry cache there \
                         (--cache-to type=registry,ref=REF,mode=max) and import that ref",
                        producer.place()
                    ),
                )
                .at(Level::Error),
                None => Finding::new(
                    Rule::CacheFromWithoutMetadata,
                    &build.file,
                    from.line,
                    format!(
                        "{} imports cache from `{reference}`, but nothing in the scanned files \
                         exports cache into it (no --cache-to type=registry,ref={reference}, no \
                         build of it with BUILDKIT_INLINE_CACHE=1): a plain image carries no \
                         cache metadata",
                        build.what
                    ),
                    format!(
                        "export cache into `{reference}` where it is built (--cache-to \
                         type=registry,ref={reference},mode=max, or BUILDKIT_INLINE_CACHE=1 on \
                         that image's build)"
                    ),
                ),
            })
        }
        CacheKind::Gha(_) | CacheKind::Local(_) => {
            let exported = builds
                .iter()
                .any(|b| b.cache_to.iter().any(|c| same_store(&c.value, &from.value)));
            let said = exported || store_unknown(&from.value.kind) || unseen.may_use(&from.value);
            (!said).then(|| {
                Finding::new(
                    Rule::CacheWriteNeverRead,
                    &build.file,
                    from.line,
                    format!(
                        "{} imports `{}`, but no build in the scanned files exports to it",
                        build.what, from.value.text
                    ),
                    "export to it with a matching --cache-to (same type and scope or \
                     directory), or drop the import",
                )
            })
        }
        CacheKind::Inline | CacheKind::Other(_) | CacheKind::Unknown => None,
    }
}

fn check_export(
    build: &Build,
    to: &At<CacheSpec>,
    builds: &[Build],
    unseen: &Unseen,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let spec = &to.value;
    if let CacheKind::Gha(_) = spec.kind
        && spec.attr("mode") == Some("max")
    {
        findings.push(Finding::new(
            Rule::GhaCacheHeavy,
            &build.file,
            to.line,
            format!(
                "{} exports every intermediate layer to GitHub's cache (type=gha, mode=max): \
                 the cache is capped at 10 GB per repository, evicts older entries, and \
                 uploads and downloads are rate-limited, so large images often build slower \
                 with it than without",
                build.what
            ),
            "use a registry cache on persistent local disk, e.g. layercache: \
             --cache-to type=registry,ref=HOST:5000/cache/app,mode=max,compression=zstd \
             (or keep type=gha with mode=min)",
        ));
    }
    if let CacheKind::Registry(reference) = &spec.kind {
        if spec.attr("compression") != Some("zstd") {
            findings.push(Finding::new(
                Rule::UncompressedChoice,
                &build.file,
                to.line,
                format!(
                    "{} exports a registry cache to `{reference}` compressed with gzip (the \
                     default), which costs CPU on every export and import; on a LAN the \
                     network is not the bottleneck",
                    build.what
                ),
                "add compression=zstd to the cache export (BuildKit >= 0.10); layers already \
                 gzip-compressed stay gzip unless force-compression=true is added too",
            ));
        }
        if !is_unknown(reference) {
            let imported = builds.iter().any(|b| {
                b.cache_from.iter().any(
                    |c| matches!(&c.value.kind, CacheKind::Registry(r) if refs_match(r, reference)),
                )
            });
            if !imported && !unseen.may_use(spec) {
                findings.push(Finding::new(
                    Rule::CacheWriteNeverRead,
                    &build.file,
                    to.line,
                    format!(
                        "{} exports cache to `{reference}`, but no build in the scanned files \
                         imports it (no --cache-from of that ref): the export costs time and \
                         storage and saves nothing",
                        build.what
                    ),
                    format!(
                        "add --cache-from type=registry,ref={reference} to the builds that \
                         should reuse it (usually this same build), or drop the export"
                    ),
                ));
            }
        }
    }
    if let CacheKind::Gha(_) | CacheKind::Local(_) = spec.kind {
        let imported = builds
            .iter()
            .any(|b| b.cache_from.iter().any(|c| same_store(&c.value, spec)));
        if !imported && !store_unknown(&spec.kind) && !unseen.may_use(spec) {
            findings.push(Finding::new(
                Rule::CacheWriteNeverRead,
                &build.file,
                to.line,
                format!(
                    "{} exports cache to `{}`, but no build in the scanned files imports it",
                    build.what, spec.text
                ),
                "import it with a matching --cache-from (same type and scope or directory), \
                 or drop the export",
            ));
        }
    }
    findings
}

/// Whether two gha or local specs name the same store.
fn same_store(a: &CacheSpec, b: &CacheSpec) -> bool {
    match (&a.kind, &b.kind) {
        (CacheKind::Gha(x), CacheKind::Gha(y)) => patterns_meet(x, y),
        (CacheKind::Local(x), CacheKind::Local(y)) => {
            patterns_meet(x.trim_end_matches('/'), y.trim_end_matches('/'))
        }
        _ => false,
    }
}

fn store_unknown(kind: &CacheKind) -> bool {
    match kind {
        CacheKind::Gha(s) | CacheKind::Local(s) => is_unknown(s),
        _ => true,
    }
}

/// Whether a value is entirely an expression (`${{ inputs.ref }}`, `$REF`), so nothing
/// can be said about it.
pub(crate) fn is_unknown(value: &str) -> bool {
    wildcard_pattern(value).trim_matches('*').trim().is_empty()
}

/// Whether an image tagged `tag` may be the image `reference` names. A tag whose
/// repository is all expressions (`${IMAGE}:${TAG}`) may be any image: it is taken for
/// `reference` only when written the same way.
fn may_produce(tag: &str, reference: &str) -> bool {
    if repository_unknown(tag) || repository_unknown(reference) {
        return tag.trim() == reference.trim();
    }
    !is_unknown(tag) && refs_match(tag, reference)
}

/// Whether an image reference's repository (what comes before its tag or digest) is
/// made only of expressions: `${IMAGE}:${TAG}`, `${REGISTRY}/${NAME}`.
fn repository_unknown(reference: &str) -> bool {
    let pattern = wildcard_pattern(reference);
    let name = pattern.split('@').next().unwrap_or("");
    let repository = match name.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => repository,
        _ => name,
    };
    repository
        .chars()
        .all(|c| c == '*' || c == '/' || c.is_whitespace())
}

/// Whether a file name computed with expressions (`Dockerfile.${{ matrix.flavor }}`)
/// may be `path`: same directory, and the name's written part matches. A name that is
/// all expressions (`${DOCKERFILE}`) may be any file and is taken for none.
pub(crate) fn may_be_path(pattern: &Path, path: &Path) -> bool {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let (Some(pattern_name), Some(path_name)) = (name(pattern), name(path)) else {
        return false;
    };
    pattern_name.contains('$')
        && !is_unknown(&pattern_name)
        && pattern.parent() == path.parent()
        && glob(&wildcard_pattern(&pattern_name), &path_name)
}

/// Whether two image references may name the same image: equal once normalised
/// (`docker.io/library/`, default tag `latest`), or equal if the expressions in either
/// (`${{ ... }}`, `${VAR}`, `$VAR`, `$(...)`) stand for the right text.
pub(crate) fn refs_match(a: &str, b: &str) -> bool {
    let (a, b) = (normalize_ref(a), normalize_ref(b));
    patterns_meet(&a, &b)
}

fn patterns_meet(a: &str, b: &str) -> bool {
    a == b || glob(&wildcard_pattern(a), b) || glob(&wildcard_pattern(b), a)
}

fn normalize_ref(reference: &str) -> String {
    let mut r = reference.trim().to_owned();
    for prefix in ["docker.io/library/", "docker.io/", "index.docker.io/"] {
        if let Some(rest) = r.strip_prefix(prefix) {
            r = rest.to_owned();
        }
    }
    if let Some(rest) = r.strip_prefix("library/") {
        r = rest.to_owned();
    }
    let last = r.rsplit('/').next().unwrap_or(&r);
    if !last.contains(':') && !last.contains('@') && !r.contains('$') {
        r.push_str(":latest");
    }
    r
}

/// The text with every expression replaced by `*`.
pub(crate) fn wildcard_pattern(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        if c == '*' {
            out.push('\u{1}');
            i += 1;
            continue;
        }
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied();
        let close = match next {
            Some('{') if chars.get(i + 2) == Some(&'{') => find_close(&chars, i + 3, "}}"),
            Some('{') => find_close(&chars, i + 2, "}"),
            Some('(') => find_close(&chars, i + 2, ")"),
            Some(n) if n.is_ascii_alphabetic() || n == '_' => {
                let mut j = i + 1;
                while chars
                    .get(j)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    j += 1;
                }
                Some(j)
            }
            _ => None,
        };
        match close {
            Some(end) => {
                if !out.ends_with('*') {
                    out.push('*');
                }
                i = end;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// The index just past `close`, searching from `from`.
fn find_close(chars: &[char], from: usize, close: &str) -> Option<usize> {
    let close: Vec<char> = close.chars().collect();
    let mut i = from;
    while i < chars.len() {
        if chars.get(i..i + close.len()) == Some(close.as_slice()) {
            return Some(i + close.len());
        }
        i += 1;
    }
    None
}

/// `*` matches any run of characters (a literal `*` in the pattern is `\u{1}`).
fn glob(pattern: &str, text: &str) -> bool {
    let mut escaped = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        match c {
            '\u{1}' => escaped.push_str("[*]"),
            '?' | '[' | ']' | '{' | '}' | '\\' => {
                escaped.push('\\');
                escaped.push(c);
            }
            c => escaped.push(c),
        }
    }
    globset::GlobBuilder::new(&escaped)
        .backslash_escape(true)
        .build()
        .is_ok_and(|g| g.compile_matcher().is_match(text))
}

/// Splits `a=1,b="x,y"` on commas outside double quotes and `${{ }}`, removing the
/// quotes.
pub(crate) fn split_csv(text: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '"' if depth == 0 => quoted = !quoted,
            ',' if !quoted && depth == 0 => fields.push(std::mem::take(&mut field)),
            _ => {
                field.push(c);
                if field.ends_with("${{") {
                    depth += 1;
                } else if depth > 0 && field.ends_with("}}") {
                    depth -= 1;
                }
            }
        }
    }
    fields.push(field);
    fields
        .into_iter()
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    use super::*;

    #[test]
    fn specs_parse_in_every_spelling() {
        assert_eq!(
            CacheSpec::parse("ghcr.io/o/app:cache").kind,
            CacheKind::Registry("ghcr.io/o/app:cache".into())
        );
        let spec = CacheSpec::parse("type=registry,ref=r:c,mode=max,compression=zstd");
        assert_eq!(spec.kind, CacheKind::Registry("r:c".into()));
        assert_eq!(spec.attr("compression"), Some("zstd"));
        assert_eq!(
            CacheSpec::parse("type=gha,mode=max").kind,
            CacheKind::Gha("buildkit".into())
        );
        assert_eq!(CacheSpec::parse("type=inline").kind, CacheKind::Inline);
        assert_eq!(
            CacheSpec::parse("type=local,dest=/tmp/c").kind,
            CacheKind::Local("/tmp/c".into())
        );
        assert_eq!(
            CacheSpec::parse("ref=r:c").kind,
            CacheKind::Registry("r:c".into())
        );
        let keyed = CacheSpec::parse("type=gha,scope=deps-${{ hashFiles('a', 'b') }},mode=max");
        assert_eq!(
            keyed.kind,
            CacheKind::Gha("deps-${{ hashFiles('a', 'b') }}".into())
        );
        assert_eq!(keyed.attr("mode"), Some("max"));
        assert_eq!(
            CacheSpec::parse("${{ inputs.cache-to }}").kind,
            CacheKind::Unknown
        );
    }

    #[test]
    fn references_match_through_defaults_and_expressions() {
        assert!(refs_match("alpine", "docker.io/library/alpine:latest"));
        assert!(refs_match(
            "ghcr.io/o/app:cache-${{ github.ref_name }}",
            "ghcr.io/o/app:cache-main"
        ));
        assert!(refs_match(
            "${REGISTRY}/app:cache",
            "${{ env.REGISTRY }}/app:cache"
        ));
        assert!(!refs_match("ghcr.io/o/app:cache", "ghcr.io/o/app:prefix"));
        assert!(repository_unknown("${BASE_IMAGE}:${TAG}"));
        assert!(repository_unknown("${{ env.REGISTRY }}/${{ env.IMAGE }}"));
        assert!(!repository_unknown("${REGISTRY}/app:${TAG}"));
        assert!(!repository_unknown("localhost:5000/app"));
        assert!(!may_produce(
            "${BASE_IMAGE}:${TAG}",
            "ghcr.io/acme/app:buildcache"
        ));
        assert!(may_produce("$IMAGE:prefix", "$IMAGE:prefix"));
        let path = |p: &str| PathBuf::from(p);
        assert!(may_be_path(
            &path("/r/Dockerfile.${{ matrix.flavor }}"),
            &path("/r/Dockerfile.alpine")
        ));
        assert!(!may_be_path(
            &path("/r/Dockerfile.${{ matrix.flavor }}"),
            &path("/r/docker/Dockerfile.alpine")
        ));
        assert!(!may_be_path(
            &path("/r/${DOCKERFILE}"),
            &path("/r/Dockerfile")
        ));
        assert!(is_unknown("${{ inputs.cache }}"));
        assert!(!is_unknown("ghcr.io/o/app:${TAG}"));
    }
}
