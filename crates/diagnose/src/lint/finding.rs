//! What a lint reports: the rules, their levels, and one finding per problem found.

use std::fmt;

use serde::Serialize;

/// How serious a finding is; ordered, so `Error > Warning > Info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Worth knowing; the cache works, but could work better.
    Info,
    /// The cache is likely lost or weakened.
    Warning,
    /// The cache is lost (or the build fails) as written.
    Error,
}

impl Level {
    /// The lowercase name used in every output format (`info`, `warning`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }

    /// The SARIF 2.1.0 level (`note`, `warning`, `error`).
    pub fn sarif(self) -> &'static str {
        match self {
            Level::Info => "note",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lint rule; its id is the kebab-case name (`compose-xbake-dropped`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// A file that could not be read or parsed.
    ParseError,
    /// Cache settings under a compose service's `x-bake`, which compose's bake path drops.
    ComposeXbakeDropped,
    /// `--cache-from` an image that nothing exports cache metadata into.
    CacheFromWithoutMetadata,
    /// A cache export nobody imports, or a cache import nothing exports.
    CacheWriteNeverRead,
    /// `type=gha` with `mode=max`.
    GhaCacheHeavy,
    /// Several images exporting `type=gha` to one scope, overwriting each other.
    GhaScopeShared,
    /// A Dockerfile stage chain with more layers than overlay filesystems stack.
    LayerDepth,
    /// A workflow matrix that expands beyond 256 jobs.
    MatrixTooLarge,
    /// A Dockerfile whose early layers change with every commit.
    ContextBustsCache,
    /// `--no-cache` on a build that also exports cache.
    NoCacheWithExport,
    /// A registry cache export compressed with the default gzip.
    UncompressedChoice,
}

impl Rule {
    /// Every rule, in the order they are documented.
    pub const ALL: [Rule; 11] = [
        Rule::ParseError,
        Rule::ComposeXbakeDropped,
        Rule::CacheFromWithoutMetadata,
        Rule::CacheWriteNeverRead,
        Rule::GhaCacheHeavy,
        Rule::GhaScopeShared,
        Rule::LayerDepth,
        Rule::MatrixTooLarge,
        Rule::ContextBustsCache,
        Rule::NoCacheWithExport,
        Rule::UncompressedChoice,
    ];

    /// The rule's id, as printed and as used in SARIF.
    pub fn id(self) -> &'static str {
        match self {
            Rule::ParseError => "parse-error",
            Rule::ComposeXbakeDropped => "compose-xbake-dropped",
            Rule::CacheFromWithoutMetadata => "cache-from-without-metadata",
            Rule::CacheWriteNeverRead => "cache-write-never-read",
            Rule::GhaCacheHeavy => "gha-cache-heavy",
            Rule::GhaScopeShared => "gha-scope-shared",
            Rule::LayerDepth => "layer-depth",
            Rule::MatrixTooLarge => "matrix-too-large",
            Rule::ContextBustsCache => "context-busts-cache",
            Rule::NoCacheWithExport => "no-cache-with-export",
            Rule::UncompressedChoice => "uncompressed-choice",
        }
    }

    /// One sentence: what the rule finds.
    pub fn summary(self) -> &'static str {
        match self {
            Rule::ParseError => "A file that could not be read or parsed.",
            Rule::ComposeXbakeDropped => {
                "Cache settings under a compose service's x-bake, which compose's bake path \
                 (COMPOSE_BAKE=true) drops silently."
            }
            Rule::CacheFromWithoutMetadata => {
                "--cache-from an image that nothing in the scanned files exports cache metadata \
                 into."
            }
            Rule::CacheWriteNeverRead => {
                "A cache export that no build imports, or a cache import that nothing exports."
            }
            Rule::GhaCacheHeavy => {
                "type=gha with mode=max: GitHub's cache is capped at 10 GB per repository and \
                 rate-limited."
            }
            Rule::GhaScopeShared => {
                "Several images exporting type=gha to the same scope: each export replaces the \
                 scope's cache, so only the last image's survives."
            }
            Rule::LayerDepth => {
                "A Dockerfile stage chain with more layers than overlay filesystems can stack."
            }
            Rule::MatrixTooLarge => "A workflow job matrix that expands beyond 256 jobs.",
            Rule::ContextBustsCache => {
                "A Dockerfile whose early layers change with every commit: the whole context \
                 copied before installing dependencies, .git in the context, or a per-commit \
                 ARG before expensive steps."
            }
            Rule::NoCacheWithExport => {
                "--no-cache on a build that also exports cache: it never reads what it writes."
            }
            Rule::UncompressedChoice => {
                "A registry cache export compressed with the default gzip rather than zstd."
            }
        }
    }

    /// How to fix what the rule finds, in general terms.
    pub fn help(self) -> &'static str {
        match self {
            Rule::ParseError => {
                "Fix the syntax at the reported line; the file was not checked further."
            }
            Rule::ComposeXbakeDropped => {
                "Move cache-from/cache-to from build.x-bake to build.cache_from/build.cache_to, \
                 which every compose build path honours."
            }
            Rule::CacheFromWithoutMetadata => {
                "Build the image with --build-arg BUILDKIT_INLINE_CACHE=1 (or --cache-to \
                 type=inline), or export a registry cache with --cache-to \
                 type=registry,ref=REF,mode=max and read that ref."
            }
            Rule::CacheWriteNeverRead => {
                "Read the export back with a matching --cache-from (same ref, scope or \
                 directory), or drop the export."
            }
            Rule::GhaCacheHeavy => {
                "Use a registry cache on persistent local disk (for example layercache: \
                 --cache-to type=registry,ref=HOST:5000/cache/app,mode=max), or mode=min."
            }
            Rule::GhaScopeShared => {
                "Give each image its own scope (scope=NAME on both --cache-to and --cache-from, \
                 e.g. the image or matrix value)."
            }
            Rule::LayerDepth => {
                "Merge consecutive RUN instructions (with && or a heredoc), copy in fewer COPY \
                 instructions, or flatten earlier layers into a fresh stage with COPY --from."
            }
            Rule::MatrixTooLarge => {
                "Split the matrix across several jobs or workflows, or exclude combinations, so \
                 that each expands to at most 256 jobs."
            }
            Rule::ContextBustsCache => {
                "Copy only the dependency manifests before installing, exclude .git in \
                 .dockerignore, and declare per-commit ARGs after the expensive steps."
            }
            Rule::NoCacheWithExport => {
                "Drop --no-cache (use --no-cache-filter for the steps that must rerun), or drop \
                 the export."
            }
            Rule::UncompressedChoice => {
                "Add compression=zstd to the cache export (BuildKit >= 0.10; add \
                 force-compression=true to recompress layers that are already gzip)."
            }
        }
    }

    /// The level a finding of this rule has unless the finding says otherwise.
    pub fn default_level(self) -> Level {
        match self {
            Rule::ParseError | Rule::ComposeXbakeDropped | Rule::MatrixTooLarge => Level::Error,
            Rule::CacheFromWithoutMetadata
            | Rule::CacheWriteNeverRead
            | Rule::GhaCacheHeavy
            | Rule::GhaScopeShared
            | Rule::LayerDepth
            | Rule::ContextBustsCache
            | Rule::NoCacheWithExport => Level::Warning,
            Rule::UncompressedChoice => Level::Info,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// One problem at one place: the rule, how serious, where, what and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The rule that found it.
    pub rule: Rule,
    /// How serious it is.
    pub level: Level,
    /// The file, relative to where the lint ran when it was given relative paths.
    pub file: String,
    /// The line (1-based) the problem is on.
    pub line: usize,
    /// What is wrong, in one sentence.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

impl Finding {
    /// A finding at the rule's default level.
    pub fn new(
        rule: Rule,
        file: impl Into<String>,
        line: usize,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            rule,
            level: rule.default_level(),
            file: file.into(),
            line: line.max(1),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// The same finding at another level.
    pub fn at(mut self, level: Level) -> Finding {
        self.level = level;
        self
    }
}

impl fmt::Display for Finding {
    /// `file:line: level rule: problem — fix`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {} {}: {} — {}",
            self.file, self.line, self.level, self.rule, self.message, self.fix
        )
    }
}
