//! Findings on real repositories' CI shapes, as small synthetic copies: each case lists
//! every finding it must give (rule, file, line), so a false alarm fails as surely as a
//! miss. The shapes come from the precision evaluation in `PRECISION.md`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use diagnose::lint::{Finding, Level, Options, Report, lint};

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/regressions")
        .join(case)
}

fn run(case: &str, exclude: &[&str]) -> Report {
    let options = Options {
        exclude: exclude.iter().map(|s| (*s).to_owned()).collect(),
    };
    lint(&[case_dir(case)], &options)
}

/// (rule, file relative to the case, line) of every finding.
fn located(case: &str, findings: &[Finding]) -> Vec<(String, String, usize)> {
    let prefix = format!("{}/", case_dir(case).display());
    findings
        .iter()
        .map(|f| {
            assert!(!f.message.is_empty() && !f.fix.is_empty(), "{f}");
            let file = f.file.strip_prefix(&prefix).unwrap_or(&f.file).to_owned();
            (f.rule.id().to_owned(), file, f.line)
        })
        .collect()
}

/// Asserts the case gives exactly `expected`, and returns its findings.
fn expect(case: &str, expected: &[(&str, &str, usize)]) -> Vec<Finding> {
    let findings = run(case, &[]).findings;
    let expected: Vec<(String, String, usize)> = expected
        .iter()
        .map(|(rule, file, line)| ((*rule).to_owned(), (*file).to_owned(), *line))
        .collect();
    assert_eq!(
        located(case, &findings),
        expected,
        "{case}:\n{}",
        findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    findings
}

#[test]
fn a_bake_step_from_the_git_context_keeps_its_cache() {
    // BuildKit keys COPY by the content of what it copies, in a git context as in a local
    // one: a step without `source:` misses nothing more than one with it.
    expect("bake-git-context", &[]);
    expect("bake-targets", &[]);
}

#[test]
fn only_a_move_of_a_local_cache_directory_is_a_rotation() {
    // `mv provenance.json dist/` is not a cache; the export nobody imports still is.
    let findings = expect(
        "mv-not-a-cache",
        &[(
            "cache-write-never-read",
            ".github/workflows/release.yml",
            25,
        )],
    );
    assert!(findings[0].message.contains("dest=/tmp/tools-cache"));
}

#[test]
fn a_local_cache_on_a_hosted_runner_needs_a_step_that_keeps_it() {
    // Only the job with no actions/cache step: not the one with it, not a self-hosted
    // machine, not a directory an earlier build of the same job fills.
    let findings = expect(
        "local-cache-hosted",
        &[("cache-write-never-read", ".github/workflows/image.yml", 11)],
    );
    assert!(
        findings[0].message.contains("job `forgotten`"),
        "{}",
        findings[0]
    );
    assert!(
        findings[0].fix.contains("path: /tmp/.buildx-cache"),
        "{}",
        findings[0]
    );
}

#[test]
fn steps_that_may_build_silence_the_pairing_rules() {
    // `uses: ./` with cache inputs is read as the build it is; a local action that may
    // build could read the registry export.
    expect("unknown-steps", &[]);
}

#[test]
fn an_arg_with_a_fixed_default_is_a_pin() {
    let findings = expect(
        "arg-pin",
        &[
            ("context-busts-cache", "Dockerfile", 13),
            ("context-busts-cache", "Dockerfile", 14),
        ],
    );
    // GIT_SHA: only its name says it; nothing here gives it a value.
    assert!(findings[0].message.contains("ARG GIT_SHA"));
    assert_eq!(findings[0].level, Level::Info);
    assert!(findings[1].message.contains("`${{ github.sha }}`"));
    assert_eq!(findings[1].level, Level::Warning);
    assert!(
        findings[1]
            .fix
            .contains("(and the ENV at line 15 that copies it)"),
        "{}",
        findings[1]
    );
}

#[test]
fn an_arg_the_expensive_step_reads_is_not_misplaced() {
    // The build embeds the revision, and the venv's timestamp is part of its output.
    expect("arg-consumed", &[]);
}

#[test]
fn a_scope_keyed_by_a_function_call_is_still_a_gha_cache() {
    expect(
        "keyed-scope",
        &[("gha-cache-heavy", ".github/workflows/test.yml", 12)],
    );
}

#[test]
fn files_of_other_languages_are_not_dockerfiles() {
    let report = run("other-languages", &[]);
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.files.len(), 1);
    assert!(report.files[0].ends_with("other-languages/Containerfile"));
}

#[test]
fn vendored_ignored_and_excluded_trees_are_not_walked() {
    let report = run("skipped-trees", &[]);
    assert_eq!(
        located("skipped-trees", &report.findings),
        vec![("parse-error".to_owned(), "legacy/Dockerfile".to_owned(), 2)]
    );
    let report = run("skipped-trees", &["legacy/"]);
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    let files: Vec<&str> = report
        .files
        .iter()
        .map(|f| f.rsplit("skipped-trees/").next().unwrap())
        .collect();
    assert_eq!(files, vec!["app/Dockerfile"]);
}

#[test]
fn a_dropped_xbake_export_has_nothing_else_to_report() {
    expect(
        "xbake-heavy",
        &[
            ("compose-xbake-dropped", "compose.yaml", 6),
            ("compose-xbake-dropped", "compose.yaml", 8),
        ],
    );
}

#[test]
fn no_cache_on_one_bake_target_names_that_target() {
    let findings = expect(
        "no-cache-target",
        &[("no-cache-with-export", ".github/workflows/nightly.yml", 12)],
    );
    assert!(
        findings[0].message.starts_with("target `postgres` of"),
        "{}",
        findings[0]
    );
}

#[test]
fn each_repository_is_its_own_scope() {
    expect(
        "several-repos",
        &[
            (
                "cache-write-never-read",
                "repo-a/.github/workflows/build.yml",
                11,
            ),
            (
                "cache-from-without-metadata",
                "repo-b/.github/workflows/build.yml",
                11,
            ),
        ],
    );
}

#[test]
fn matrices_from_inputs_take_their_defaults_and_callers() {
    let findings = expect(
        "matrix-inputs",
        &[
            ("matrix-too-large", ".github/workflows/ci-linux.yml", 22),
            ("matrix-too-large", ".github/workflows/small.yml", 12),
        ],
    );
    assert!(findings[0].message.contains("258 jobs"), "{}", findings[0]);
    assert!(
        findings[1].message.contains("weekly.yml:5"),
        "{}",
        findings[1]
    );
}

#[test]
fn images_sharing_one_gha_scope_are_reported() {
    expect(
        "gha-scope",
        &[
            ("gha-scope-shared", ".github/workflows/images.yml", 11),
            ("gha-scope-shared", ".github/workflows/images.yml", 44),
            ("gha-scope-shared", "docker-bake.hcl", 3),
        ],
    );
}

#[test]
fn compose_builds_in_scripts_feed_per_commit_args() {
    let findings = expect(
        "compose-build-args",
        &[
            ("context-busts-cache", "Dockerfile", 2),
            ("context-busts-cache", "api/Dockerfile", 2),
        ],
    );
    assert!(findings[0].message.contains("ARG REVISION"));
    assert!(findings[1].message.contains("ARG COMMIT_SHA"));
}

#[test]
fn the_whole_context_before_any_installer_is_reported() {
    let installers = [
        ("bundler", "bundle install"),
        ("cargo", "cargo fetch"),
        ("clojure", "clojure -P"),
        ("composer", "composer install"),
        ("dotnet", "dotnet restore"),
        ("go", "go mod download"),
        ("gradle", "gradlew dependencies"),
        ("lein", "lein deps"),
        ("maven", "mvn dependency:go-offline"),
        ("pipenv", "pipenv install"),
        ("poetry", "poetry install"),
    ];
    let files: Vec<String> = installers
        .iter()
        .map(|(name, _)| format!("{name}.Dockerfile"))
        .collect();
    let expected: Vec<(&str, &str, usize)> = files
        .iter()
        .map(|f| ("context-busts-cache", f.as_str(), 3))
        .collect();
    let findings = expect("installers", &expected);
    for (finding, (_, command)) in findings.iter().zip(installers) {
        assert!(finding.message.contains(command), "{finding}");
    }
}

#[test]
fn values_computed_by_expressions_are_evaluated_or_left_unknown() {
    // format() is evaluated (its export pairs with the import and is gzip); a spec that is
    // wholly an expression is unknown, so nothing is said of its compression or pairing.
    let findings = expect(
        "computed-specs",
        &[("uncompressed-choice", ".github/workflows/images.yml", 17)],
    );
    assert!(
        findings[0]
            .message
            .contains("`${{ env.REGISTRY }}/acme/cache/app:"),
        "{}",
        findings[0]
    );
}

#[test]
fn git_in_the_context_is_reported_only_where_it_busts_a_run_for_nothing() {
    expect("git-reincluded", &[]);
    expect("git-described", &[]);
    expect("git-script", &[]);
    expect("git-kept", &[]);
    expect("git-last-layer", &[]);
    // `make release` runs a Makefile that includes one calling `git rev-parse`.
    expect("git-make", &[]);
    // Not needed (-buildvcs=false), and a RUN follows: reported once, under the file
    // the symlink `Dockerfile` points to.
    expect(
        "git-dead-weight",
        &[("context-busts-cache", "docker/Dockerfile.debian", 5)],
    );
}

#[test]
fn a_flow_sequence_closed_at_its_key_indentation_parses() {
    expect(
        "flow-close",
        &[("compose-xbake-dropped", "compose.yaml", 6)],
    );
}

#[test]
fn an_image_named_only_by_variables_is_not_the_producer_of_every_ref() {
    // `image: ${BUILD_BASE_IMAGE}:${TAG}` may be any image: it is not taken for the
    // `alpine:3.20` the services import. Nothing exports cache there, which is said,
    // but as the warning it is, not as an error about the base service.
    let findings = expect(
        "variable-image",
        &[
            ("cache-from-without-metadata", "compose.yaml", 6),
            ("cache-from-without-metadata", "compose.yaml", 13),
        ],
    );
    for finding in &findings {
        assert_eq!(finding.level, Level::Warning, "{finding}");
        assert!(
            finding.message.contains("nothing in the scanned files"),
            "{finding}"
        );
    }
}

#[test]
fn dependencies_installed_in_an_earlier_stage_count() {
    // The stage built on `base`, which installed requirements.txt, installs only the
    // project; one built on a stage that installed nothing is still reported.
    expect(
        "deps-in-parent-stage",
        &[("context-busts-cache", "docker/lint.Dockerfile", 5)],
    );
    // Python packages installed in `python-deps` and brought in with `COPY --from`; a
    // stage that copies only curl from another still installs after the copy.
    let findings = expect(
        "deps-in-copied-stage",
        &[("context-busts-cache", "docker/Dockerfile.ui", 6)],
    );
    assert!(findings[0].message.contains("`npm ci`"), "{}", findings[0]);
}

#[test]
fn cargo_chef_prepare_is_the_planner_not_an_install() {
    // `COPY . .` + `cargo chef prepare` writes the recipe that `cargo chef cook` builds
    // from before the sources are copied; the npm project copying everything first is real.
    expect(
        "cargo-chef",
        &[("context-busts-cache", "tools/schema2openapi/Dockerfile", 5)],
    );
}

#[test]
fn git_refs_brought_back_into_the_context_are_named() {
    // `.git/` is excluded, then `.git/HEAD` and `.git/refs/heads/*` are brought back
    // (read at run time for the version). The branch's ref file holds the commit it
    // points to, and HEAD holds the commit itself in the detached checkout CI makes of
    // pull requests and tags: the context still changes with every commit, so the copy
    // and the install after it miss. The finding stands, naming those lines.
    let findings = expect("git-partial", &[("context-busts-cache", "Dockerfile", 10)]);
    let finding = &findings[0];
    assert!(
        finding
            .message
            .contains("excludes .git but brings back `!.git/HEAD`, `!.git/refs/heads/*`"),
        "{finding}"
    );
    assert!(!finding.fix.contains("add `.git`"), "{finding}");
    assert!(finding.fix.contains("build argument"), "{finding}");
}

#[test]
fn compose_files_named_with_a_suffix_are_read_if_they_define_services() {
    let report = run("compose-names", &[]);
    expect(
        "compose-names",
        &[(
            "cache-from-without-metadata",
            "docker-compose_v3_alpine_local.yaml",
            9,
        )],
    );
    let read: Vec<&str> = report
        .files
        .iter()
        .map(|f| f.rsplit("compose-names/").next().unwrap())
        .collect();
    assert_eq!(
        read,
        vec![
            "Dockerfiles/server/alpine/Dockerfile",
            "compose_components.yaml",
            "docker-compose_v3_alpine_local.yaml",
        ]
    );
}

#[test]
fn builds_sharing_a_gha_scope_are_named_by_job() {
    let mut expected: Vec<(&str, &str, usize)> = [18, 32, 46, 60, 74, 88, 102, 116]
        .iter()
        .map(|line| {
            (
                "gha-cache-heavy",
                ".github/workflows/release-stable.yml",
                *line,
            )
        })
        .collect();
    expected.insert(
        1,
        (
            "gha-scope-shared",
            ".github/workflows/release-stable.yml",
            18,
        ),
    );
    let findings = expect("gha-scope-jobs", &expected);
    assert!(
        findings[1].message.starts_with(
            "jobs `base`, `base-java`, `jibri`, `jicofo`, `jigasi`, `jvb` and 2 more \
             (docker/build-push-action) export type=gha to the same scope `buildkit`"
        ),
        "{}",
        findings[1]
    );
}

#[test]
fn a_step_output_written_from_git_describe_is_per_commit() {
    // The version a step echoes to $GITHUB_OUTPUT from `git describe` reaches every
    // flavour's Dockerfile (`Dockerfile.${{ matrix.flavor }}`) ahead of its package
    // install; the docker-gen version read from the Dockerfile with sed is a pin.
    let findings = expect(
        "step-output-arg",
        &[
            ("context-busts-cache", "Dockerfile.alpine", 4),
            ("context-busts-cache", "Dockerfile.debian", 4),
        ],
    );
    for finding in &findings {
        assert!(finding.message.contains("ARG PROXY_VERSION"), "{finding}");
        assert!(finding.message.contains("git describe"), "{finding}");
        assert_eq!(finding.level, Level::Warning, "{finding}");
    }
}

#[test]
fn compose_values_come_from_the_env_file_beside_it() {
    // `${ALPINE_CACHE_FROM}` is `alpine:3.20` by the .env file beside the compose file:
    // an image with no cache metadata.
    let findings = expect(
        "compose-dotenv",
        &[("cache-from-without-metadata", "compose.yaml", 6)],
    );
    assert!(
        findings[0].message.contains("`alpine:3.20`"),
        "{}",
        findings[0]
    );
}

#[test]
fn builds_in_a_composite_action_of_the_repository_are_read() {
    // Each call gives its own target; `docker` and `lint` export to the one default
    // scope, mode=max, and each platform of the matrix to it as well.
    let findings = expect(
        "composite-action",
        &[
            (
                "gha-cache-heavy",
                ".github/actions/build-image/action.yaml",
                23,
            ),
            (
                "gha-scope-shared",
                ".github/actions/build-image/action.yaml",
                23,
            ),
            (
                "gha-scope-shared",
                ".github/actions/build-image/action.yaml",
                23,
            ),
        ],
    );
    assert!(
        findings[1].message.contains("in each job of its matrix"),
        "{}",
        findings[1]
    );
    assert!(
        findings[2].message.starts_with(
            "target `docker` and target `lint` in job `deploy-docker` (docker/build-push-action)"
        ),
        "{}",
        findings[2]
    );
}

#[test]
fn builds_in_the_scripts_a_step_runs_are_read_where_they_are_written() {
    // `cd tools && ./image.sh` runs tools/push-image.sh from tools/; `bash ci/legacy.sh`
    // pulls and imports an image no build gives cache metadata; `exec ci/dev.sh` exports
    // gha with mode=max; web/build.sh, run from the job's working-directory, imports a
    // local cache that nothing keeps on a hosted runner.
    let findings = expect(
        "script-steps",
        &[
            ("gha-cache-heavy", "ci/dev.sh", 5),
            ("cache-from-without-metadata", "ci/legacy.sh", 4),
            ("uncompressed-choice", "tools/push-image.sh", 5),
            ("cache-write-never-read", "web/build.sh", 4),
        ],
    );
    assert!(
        findings[3].message.contains("job `site`"),
        "{}",
        findings[3]
    );
    let report = run("script-steps", &[]);
    let read: Vec<&str> = report
        .files
        .iter()
        .filter_map(|f| f.rsplit_once("script-steps/").map(|(_, f)| f))
        .collect();
    assert_eq!(
        read,
        vec![
            ".github/workflows/ci.yml",
            "ci/dev.sh",
            "ci/legacy.sh",
            "tools/image.sh",
            "tools/push-image.sh",
            "web/build.sh",
        ]
    );
}

#[test]
fn what_a_script_computes_is_unknown_not_guessed() {
    // release.sh sets CACHE_REF from its argument, over the workflow's CACHE_REF;
    // with-options.sh takes its export in "$@"; a script named by an expression and a
    // Makefile recipe are not read.
    expect("script-unknowns", &[]);
}

#[test]
fn scripts_are_followed_once_per_chain_inside_the_repository_and_so_deep() {
    // a.sh and b.sh run each other; ci/link.sh and ../elsewhere/build.sh lead out of the
    // repository; ci/depth/N.sh runs N+1.sh, and only eight are read below the step.
    let mut expected = vec![
        ("gha-cache-heavy", "repo/ci/a.sh".to_owned(), 3),
        ("gha-cache-heavy", "repo/ci/b.sh".to_owned(), 3),
    ];
    for depth in 1..=8 {
        expected.push(("gha-cache-heavy", format!("repo/ci/depth/{depth}.sh"), 3));
    }
    let expected: Vec<(&str, &str, usize)> = expected
        .iter()
        .map(|(rule, file, line)| (*rule, file.as_str(), *line))
        .collect();
    expect("script-loops", &expected);
}

#[test]
fn a_script_that_moves_to_its_own_directory_builds_from_there() {
    // deploy.sh does `cd "$(dirname "$0")"`, image.sh `cd "$ROOT"` with ROOT its
    // directory's grandparent: the build's Dockerfile is app/Dockerfile, given the commit
    // by the script; the local cache is kept by actions/cache.
    let findings = expect(
        "script-own-dir",
        &[("context-busts-cache", "app/Dockerfile", 2)],
    );
    assert_eq!(findings[0].level, Level::Warning);
    assert!(
        findings[0].message.contains(".github/scripts/image.sh:8"),
        "{}",
        findings[0]
    );
}
