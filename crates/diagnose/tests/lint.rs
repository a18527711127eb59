//! Each lint rule on its fixtures: it fires on `bad/` at the right file and line, and
//! nowhere else; the corrected copy in `good/` has no findings at all. Malformed inputs
//! give a `parse-error` with file and line and leave the other files linted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use diagnose::lint::{Finding, Level, Rule, lint_paths};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lint")
        .join(case)
}

fn lint(case: &str) -> Vec<Finding> {
    lint_paths(&[fixture(case)]).findings
}

/// (file relative to the fixture, line, level) of every finding, checking that all
/// findings are of `rule`.
fn only(case: &str, rule: Rule) -> Vec<(String, usize, Level)> {
    let prefix = format!("{}/", fixture(case).display());
    let findings = lint(case);
    for f in &findings {
        assert_eq!(f.rule, rule, "{case}: unexpected finding {f}");
        assert!(!f.message.is_empty() && !f.fix.is_empty(), "{f}");
    }
    findings
        .iter()
        .map(|f| {
            let file = f.file.strip_prefix(&prefix).unwrap_or(&f.file).to_owned();
            (file, f.line, f.level)
        })
        .collect()
}

fn at(file: &str, line: usize, level: Level) -> (String, usize, Level) {
    (file.to_owned(), line, level)
}

fn assert_clean(case: &str) {
    let findings = lint(case);
    assert!(
        findings.is_empty(),
        "{case} should have no findings:\n{}",
        findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn compose_xbake_cache_settings_are_reported_per_service() {
    assert_eq!(
        only("compose-xbake-dropped/bad", Rule::ComposeXbakeDropped),
        vec![
            at("compose.yaml", 9, Level::Error),
            at("compose.yaml", 11, Level::Error),
            at("compose.yaml", 19, Level::Error),
            at("compose.yaml", 21, Level::Error),
            at("compose.yaml", 29, Level::Error),
            at("compose.yaml", 31, Level::Error),
        ]
    );
    let first = &lint("compose-xbake-dropped/bad")[0];
    assert!(first.message.contains("service `web`"), "{first}");
    assert!(first.fix.contains("build.cache_from"), "{first}");
    assert_clean("compose-xbake-dropped/good");
}

#[test]
fn two_hundred_runs_exceed_the_layer_limit_and_a_deep_chain_warns() {
    let generated = std::fs::read_to_string(fixture("layer-depth/bad/Dockerfile")).unwrap();
    assert_eq!(
        generated.lines().filter(|l| l.starts_with("RUN ")).count(),
        200
    );
    assert_eq!(
        only("layer-depth/bad", Rule::LayerDepth),
        vec![
            // The 125th RUN (line 3 is FROM).
            at("Dockerfile", 128, Level::Error),
            // base (60 RUN) → tools (50 COPY): the 100th layer is the 40th COPY.
            at("Dockerfile.chain", 103, Level::Warning),
        ]
    );
    let findings = lint("layer-depth/bad");
    assert!(
        findings[0].message.contains("200 layers"),
        "{}",
        findings[0]
    );
    assert!(findings[0].message.contains("not known"), "{}", findings[0]);
    assert!(
        findings[1].message.contains("`base` → `tools`"),
        "{}",
        findings[1]
    );
    assert_clean("layer-depth/good");
}

#[test]
fn a_matrix_of_276_jobs_is_too_large_and_a_dynamic_one_is_not_judged() {
    assert_eq!(
        only("matrix-too-large/bad", Rule::MatrixTooLarge),
        vec![at(".github/workflows/tests.yml", 22, Level::Error)]
    );
    let finding = &lint("matrix-too-large/bad")[0];
    assert!(finding.message.contains("276 jobs"), "{finding}");
    assert!(
        finding.message.contains("46 shard × 3 python × 2 os"),
        "{finding}"
    );
    assert_clean("matrix-too-large/good");
}

#[test]
fn cache_from_an_image_built_without_inline_cache_is_reported() {
    assert_eq!(
        only(
            "cache-from-without-metadata/bad",
            Rule::CacheFromWithoutMetadata
        ),
        vec![
            // `--cache-from "$IMAGE:prefix"`, the image the `prefix` job pushed.
            at(".github/workflows/build.yml", 25, Level::Error),
            // build-push-action `cache-from: <its own image>`.
            at(".github/workflows/build.yml", 37, Level::Error),
            // compose `cache_from:` its own image.
            at("compose.yaml", 7, Level::Error),
        ]
    );
    let finding = &lint("cache-from-without-metadata/bad")[0];
    assert!(
        finding.message.contains("ghcr.io/acme/math:prefix"),
        "{finding}"
    );
    assert!(finding.message.contains("build.yml:12"), "{finding}");
    assert!(finding.fix.contains("BUILDKIT_INLINE_CACHE=1"), "{finding}");
    assert_clean("cache-from-without-metadata/good");
}

#[test]
fn exports_nobody_imports_and_imports_nobody_exports_are_reported() {
    assert_eq!(
        only("cache-write-never-read/bad", Rule::CacheWriteNeverRead),
        vec![
            at(".github/workflows/ci.yml", 10, Level::Warning),
            at(".github/workflows/ci.yml", 21, Level::Warning),
        ]
    );
    assert_clean("cache-write-never-read/good");
}

#[test]
fn gha_cache_with_mode_max_is_reported() {
    assert_eq!(
        only("gha-cache-heavy/bad", Rule::GhaCacheHeavy),
        vec![at(".github/workflows/image.yml", 15, Level::Warning)]
    );
    let finding = &lint("gha-cache-heavy/bad")[0];
    assert!(finding.fix.contains("layercache"), "{finding}");
    assert_clean("gha-cache-heavy/good");
}

#[test]
fn context_copies_git_and_per_commit_args_are_reported() {
    assert_eq!(
        only("context-busts-cache/bad", Rule::ContextBustsCache),
        vec![
            at("Dockerfile", 4, Level::Warning),
            at("Dockerfile", 4, Level::Warning),
            at("api/Dockerfile", 3, Level::Warning),
            // Named like a per-commit value, but no build read here gives it one.
            at("api/Dockerfile", 4, Level::Info),
        ]
    );
    let findings = lint("context-busts-cache/bad");
    let messages: Vec<&str> = findings.iter().map(|f| f.message.as_str()).collect();
    assert!(messages[0].contains("no .dockerignore"), "{}", messages[0]);
    assert!(
        messages[1].contains("before `npm ci` at line 5"),
        "{}",
        messages[1]
    );
    assert!(messages[2].contains("${{ github.sha }}"), "{}", messages[2]);
    assert!(messages[2].contains("release.yml:16"), "{}", messages[2]);
    assert!(messages[3].contains("ARG GIT_COMMIT"), "{}", messages[3]);
    assert_clean("context-busts-cache/good");
}

#[test]
fn no_cache_with_a_cache_export_is_reported_in_every_file_kind() {
    assert_eq!(
        only("no-cache-with-export/bad", Rule::NoCacheWithExport),
        vec![
            at(".github/workflows/nightly.yml", 11, Level::Warning),
            at(".github/workflows/nightly.yml", 25, Level::Warning),
            at("compose.yaml", 7, Level::Warning),
            at("docker-bake.hcl", 4, Level::Warning),
        ]
    );
    assert_clean("no-cache-with-export/good");
}

#[test]
fn registry_cache_without_zstd_is_an_info() {
    assert_eq!(
        only("uncompressed-choice/bad", Rule::UncompressedChoice),
        vec![at("docker-bake.json", 7, Level::Info)]
    );
    assert_clean("uncompressed-choice/good");
}

#[test]
fn malformed_files_are_parse_errors_with_lines_and_the_rest_is_still_linted() {
    let report = lint_paths(&[fixture("malformed")]);
    let prefix = format!("{}/", fixture("malformed").display());
    let found: Vec<(String, usize, Rule)> = report
        .findings
        .iter()
        .map(|f| {
            (
                f.file.strip_prefix(&prefix).unwrap().to_owned(),
                f.line,
                f.rule,
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            (
                ".github/workflows/broken.yml".to_owned(),
                6,
                Rule::ParseError
            ),
            (
                ".github/workflows/valid.yml".to_owned(),
                11,
                Rule::GhaCacheHeavy
            ),
            ("Dockerfile".to_owned(), 3, Rule::ParseError),
            ("bad-instruction.Dockerfile".to_owned(), 3, Rule::ParseError),
            ("compose.yaml".to_owned(), 6, Rule::ParseError),
            ("docker-bake.hcl".to_owned(), 4, Rule::ParseError),
            ("docker-bake.json".to_owned(), 6, Rule::ParseError),
        ]
    );
    let message = |file: &str| {
        report
            .findings
            .iter()
            .find(|f| f.file.ends_with(file))
            .map(|f| f.message.clone())
            .unwrap()
    };
    assert!(message("/Dockerfile").contains("unterminated heredoc <<EOF"));
    assert!(message("bad-instruction.Dockerfile").contains("unknown instruction: COPPY"));
    assert!(message("docker-bake.hcl").starts_with("not valid HCL"));
    assert!(message("docker-bake.json").starts_with("not valid JSON"));
    assert!(message("compose.yaml").starts_with("not valid YAML"));
    assert_eq!(report.files.len(), 7);
    assert!(report.fails_at(Level::Error));
}

#[test]
fn a_missing_path_is_reported_not_a_panic() {
    let report = lint_paths(&[fixture("does-not-exist")]);
    assert_eq!(report.findings.len(), 1);
    assert_eq!(report.findings[0].rule, Rule::ParseError);
}

#[test]
fn a_single_file_can_be_linted_on_its_own() {
    let report = lint_paths(&[fixture("gha-cache-heavy/bad/.github/workflows/image.yml")]);
    assert_eq!(report.findings.len(), 1);
    assert_eq!(report.findings[0].rule, Rule::GhaCacheHeavy);
}

/// Every fixture cut short at every line and at many byte offsets, and with each line
/// removed in turn: whatever the parsers make of it, the lint answers (no panic).
#[test]
fn truncated_and_damaged_inputs_never_panic() {
    let root = fixture("");
    let scratch = std::env::temp_dir().join(format!("layercache-lint-{}", std::process::id()));
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 30);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let target = scratch.join(file.strip_prefix(&root).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut variants: Vec<String> = (0..lines.len()).map(|n| lines[..n].join("\n")).collect();
        variants.extend(
            (0..text.len())
                .step_by(13)
                .filter(|&i| text.is_char_boundary(i))
                .map(|i| text[..i].to_owned()),
        );
        variants.extend((0..lines.len()).map(|skip| {
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, l)| *l)
                .collect::<Vec<_>>()
                .join("\n")
        }));
        for variant in variants {
            std::fs::write(&target, &variant).unwrap();
            let report = lint_paths(&[&target]);
            for finding in &report.findings {
                assert!(finding.line >= 1, "{finding}");
            }
        }
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn the_walk_skips_git_target_and_node_modules() {
    let root = std::env::temp_dir().join(format!("layercache-walk-{}", std::process::id()));
    for dir in [".git", "target", "node_modules/pkg", "app"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("Dockerfile"), "FROM alpine\n").unwrap();
    }
    std::fs::write(root.join("app/notes.yml"), "not: linted\n").unwrap();
    let report = lint_paths(&[&root]);
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(
        report.files,
        vec![format!("{}/app/Dockerfile", root.display())]
    );
    assert!(report.findings.is_empty());
}
