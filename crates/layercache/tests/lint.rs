//! `layercache lint` end to end through the binary: text, JSON and SARIF output on the
//! lint fixtures, the exit status against `--level`, malformed inputs, the default path.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diagnose/tests/fixtures/lint")
}

/// Runs `layercache lint ARGS` in the fixtures directory (so paths print relative).
fn lint(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_layercache"))
        .arg("lint")
        .args(args)
        .current_dir(fixtures())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn text_output_is_one_line_per_finding_and_a_summary() {
    let output = lint(&["compose-xbake-dropped/bad"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert!(
        lines[0].starts_with(
            "compose-xbake-dropped/bad/compose.yaml:9: error compose-xbake-dropped: service `web`"
        ),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(" — move it to build.cache_from"),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[6],
        "6 findings (6 error(s), 0 warning(s), 0 info) in 1 file"
    );
}

#[test]
fn json_output_lists_every_finding_with_its_fields() {
    let output = lint(&[
        "--format",
        "json",
        "layer-depth/bad",
        "matrix-too-large/bad",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let findings: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    let summary: Vec<(&str, &str, &str, u64)> = findings
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap(),
                f["level"].as_str().unwrap(),
                f["file"].as_str().unwrap(),
                f["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("layer-depth", "error", "layer-depth/bad/Dockerfile", 128),
            (
                "layer-depth",
                "warning",
                "layer-depth/bad/Dockerfile.chain",
                103
            ),
            (
                "matrix-too-large",
                "error",
                "matrix-too-large/bad/.github/workflows/tests.yml",
                22
            ),
        ]
    );
    for f in &findings {
        assert!(!f["message"].as_str().unwrap().is_empty());
        assert!(!f["fix"].as_str().unwrap().is_empty());
    }
}

#[test]
fn sarif_output_has_the_structure_code_scanning_reads() {
    let output = lint(&[
        "--format",
        "sarif",
        "--level",
        "warning",
        "cache-write-never-read/bad",
        "uncompressed-choice/bad",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let log: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(log["version"], "2.1.0");
    assert!(log["$schema"].as_str().unwrap().contains("sarif-2.1.0"));
    let run = &log["runs"][0];
    let driver = &run["tool"]["driver"];
    assert_eq!(driver["name"], "layercache");
    let rules = driver["rules"].as_array().unwrap();
    let ids: Vec<&str> = rules.iter().map(|r| r["id"].as_str().unwrap()).collect();
    for id in [
        "parse-error",
        "compose-xbake-dropped",
        "gha-scope-shared",
        "cache-from-without-metadata",
        "cache-write-never-read",
        "gha-cache-heavy",
        "layer-depth",
        "matrix-too-large",
        "context-busts-cache",
        "no-cache-with-export",
        "uncompressed-choice",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    for rule in rules {
        assert!(
            !rule["shortDescription"]["text"]
                .as_str()
                .unwrap()
                .is_empty()
        );
        assert!(!rule["help"]["text"].as_str().unwrap().is_empty());
    }
    let results = run["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let located: Vec<(&str, &str, &str, u64)> = results
        .iter()
        .map(|r| {
            let location = &r["locations"][0]["physicalLocation"];
            let index = r["ruleIndex"].as_u64().unwrap() as usize;
            assert_eq!(rules[index]["id"], r["ruleId"]);
            assert!(!r["message"]["text"].as_str().unwrap().is_empty());
            (
                r["ruleId"].as_str().unwrap(),
                r["level"].as_str().unwrap(),
                location["artifactLocation"]["uri"].as_str().unwrap(),
                location["region"]["startLine"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        located,
        vec![
            (
                "cache-write-never-read",
                "warning",
                "cache-write-never-read/bad/.github/workflows/ci.yml",
                10
            ),
            (
                "cache-write-never-read",
                "warning",
                "cache-write-never-read/bad/.github/workflows/ci.yml",
                21
            ),
            (
                "uncompressed-choice",
                "note",
                "uncompressed-choice/bad/docker-bake.json",
                7
            ),
        ]
    );
}

#[test]
fn the_exit_status_follows_the_level() {
    // Warnings only: passes at the default level (error), fails at --level warning.
    assert_eq!(lint(&["gha-cache-heavy/bad"]).status.code(), Some(0));
    assert_eq!(
        lint(&["--level", "warning", "gha-cache-heavy/bad"])
            .status
            .code(),
        Some(1)
    );
    // An info only fails at --level info.
    assert_eq!(
        lint(&["--level", "warning", "uncompressed-choice/bad"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        lint(&["--level", "info", "uncompressed-choice/bad"])
            .status
            .code(),
        Some(1)
    );
    // Clean files pass at any level.
    let clean = lint(&["--level", "info", "gha-cache-heavy/good"]);
    assert_eq!(clean.status.code(), Some(0));
    assert_eq!(stdout(&clean), "no findings in 1 file\n");
}

#[test]
fn malformed_inputs_fail_with_file_and_line_and_the_other_files_are_linted() {
    let output = lint(&["malformed"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    for expected in [
        "malformed/.github/workflows/broken.yml:6: error parse-error: not valid YAML",
        "malformed/Dockerfile:3: error parse-error: not valid Dockerfile syntax: unterminated heredoc",
        "malformed/bad-instruction.Dockerfile:3: error parse-error: not valid Dockerfile syntax: unknown instruction: COPPY",
        "malformed/compose.yaml:6: error parse-error: not valid YAML",
        "malformed/docker-bake.hcl:4: error parse-error: not valid HCL",
        "malformed/docker-bake.json:6: error parse-error: not valid JSON",
        "malformed/.github/workflows/valid.yml:11: warning gha-cache-heavy:",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(expected)),
            "missing {expected:?} in\n{text}"
        );
    }
    assert!(text.ends_with("in 7 files\n"), "{text}");
}

#[test]
fn without_paths_the_current_directory_is_linted() {
    let output = Command::new(env!("CARGO_BIN_EXE_layercache"))
        .args(["lint", "--format", "json"])
        .current_dir(fixtures().join("gha-cache-heavy/bad"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let findings: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0]["file"], ".github/workflows/image.yml");
    assert_eq!(findings[0]["line"], 15);
}

#[test]
fn a_path_that_does_not_exist_is_a_usage_error() {
    let output = lint(&["no-such-directory"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-directory"), "{stderr}");
}

#[test]
fn json_is_the_json_format_and_exclude_leaves_trees_out() {
    let case = "../regressions/skipped-trees";
    let output = lint(&["--json", case]);
    assert_eq!(output.status.code(), Some(1));
    let findings: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    let files: Vec<&str> = findings
        .iter()
        .map(|f| f["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec![format!("{case}/legacy/Dockerfile")]);
    assert_eq!(findings[0]["rule"], "parse-error");

    let output = lint(&["--json", "--exclude", "legacy/", "--exclude", "*.md", case]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output).trim(), "[]");

    // One way to ask for the format, not two.
    assert_eq!(
        lint(&["--json", "--format", "sarif", case]).status.code(),
        Some(2)
    );
}
