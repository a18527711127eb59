//! A lint report as text (one finding per line and a summary), JSON (the findings), or
//! SARIF 2.1.0 (for GitHub code scanning).

use serde_json::{Value, json};

use super::Report;
use super::finding::{Level, Rule};

/// `file:line: level rule: problem — fix` per finding, then a summary line.
pub(crate) fn text(report: &Report) -> String {
    let mut out = String::new();
    for finding in &report.findings {
        out.push_str(&finding.to_string());
        out.push('\n');
    }
    let files = report.files.len();
    let files = format!("{files} file{}", if files == 1 { "" } else { "s" });
    if report.findings.is_empty() {
        out.push_str(&format!("no findings in {files}\n"));
    } else {
        let count = |level| report.findings.iter().filter(|f| f.level == level).count();
        let total = report.findings.len();
        out.push_str(&format!(
            "{total} finding{} ({} error(s), {} warning(s), {} info) in {files}\n",
            if total == 1 { "" } else { "s" },
            count(Level::Error),
            count(Level::Warning),
            count(Level::Info),
        ));
    }
    out
}

/// The findings as a JSON array of `{rule, level, file, line, message, fix}`.
pub(crate) fn json(report: &Report) -> String {
    serde_json::to_string_pretty(&report.findings).unwrap_or_else(|_| "[]".to_owned())
}

/// A SARIF 2.1.0 log with one run: every rule, and one result per finding.
pub(crate) fn sarif(report: &Report) -> String {
    let rules: Vec<Value> = Rule::ALL
        .iter()
        .map(|rule| {
            json!({
                "id": rule.id(),
                "name": rule_name(*rule),
                "shortDescription": { "text": rule.summary() },
                "fullDescription": { "text": rule.summary() },
                "help": { "text": rule.help(), "markdown": rule.help() },
                "defaultConfiguration": { "level": rule.default_level().sarif() },
            })
        })
        .collect();
    let results: Vec<Value> = report
        .findings
        .iter()
        .map(|finding| {
            let index = Rule::ALL
                .iter()
                .position(|r| *r == finding.rule)
                .unwrap_or(0);
            json!({
                "ruleId": finding.rule.id(),
                "ruleIndex": index,
                "level": finding.level.sarif(),
                "message": { "text": format!("{} — {}", finding.message, finding.fix) },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": uri(&finding.file) },
                        "region": { "startLine": finding.line },
                    }
                }],
            })
        })
        .collect();
    let log = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "layercache",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": rules,
                }
            },
            "results": results,
        }],
    });
    serde_json::to_string_pretty(&log).unwrap_or_default()
}

/// `compose-xbake-dropped` → `ComposeXbakeDropped`.
fn rule_name(rule: Rule) -> String {
    rule.id()
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// A relative path as a URI reference (`/`-separated, spaces and `%` escaped); an
/// absolute path as a `file://` URI.
fn uri(path: &str) -> String {
    let escaped: String = path
        .chars()
        .map(|c| match c {
            ' ' => "%20".to_owned(),
            '%' => "%25".to_owned(),
            '#' => "%23".to_owned(),
            '?' => "%3F".to_owned(),
            '\\' => "/".to_owned(),
            c => c.to_string(),
        })
        .collect();
    if escaped.starts_with('/') {
        format!("file://{escaped}")
    } else {
        escaped
    }
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
    use crate::lint::Finding;

    fn report() -> Report {
        Report {
            findings: vec![Finding::new(
                Rule::GhaCacheHeavy,
                "dir with space/ci.yml",
                7,
                "problem",
                "fix",
            )],
            files: vec!["dir with space/ci.yml".into()],
        }
    }

    #[test]
    fn text_is_one_line_per_finding_and_a_summary() {
        assert_eq!(
            text(&report()),
            "dir with space/ci.yml:7: warning gha-cache-heavy: problem — fix\n1 finding (0 error(s), 1 warning(s), 0 info) in 1 file\n"
        );
    }

    #[test]
    fn sarif_names_the_rules_and_locates_results() {
        let log: Value = serde_json::from_str(&sarif(&report())).unwrap();
        assert_eq!(log["version"], "2.1.0");
        let run = &log["runs"][0];
        assert_eq!(run["tool"]["driver"]["name"], "layercache");
        assert_eq!(run["tool"]["driver"]["rules"][4]["id"], "gha-cache-heavy");
        assert_eq!(run["tool"]["driver"]["rules"][4]["name"], "GhaCacheHeavy");
        let result = &run["results"][0];
        assert_eq!(result["ruleIndex"], 4);
        assert_eq!(
            result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
            "dir%20with%20space/ci.yml"
        );
        assert_eq!(
            result["locations"][0]["physicalLocation"]["region"]["startLine"],
            7
        );
    }
}
