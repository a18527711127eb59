#!/usr/bin/env bash
# Every test: unit, protocol conformance, durability, concurrency, and the real clients
# (dockerd/BuildKit, buildah, skopeo), which this script installs and starts first.
# Under CI=true a missing client fails the run instead of skipping its tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-clients.sh
export REQUIRE_REAL_CLIENTS=1
cargo test --release --workspace --all-targets

# Then a bounded coverage-guided run of every fuzz target (a few minutes; fails on a crash).
scripts/fuzz.sh --ci
