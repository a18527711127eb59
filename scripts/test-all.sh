#!/usr/bin/env bash
# Every test: unit, protocol conformance, durability, concurrency, the real clients
# (dockerd/BuildKit, buildah, skopeo) and scale-out over PostgreSQL and Garage, which
# this script installs and starts first. Garage, when missing, is built from crates.io
# (several minutes) while the workspace builds. A missing client or service fails the
# run instead of skipping its tests.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$HOME/.cargo/bin:$PATH"
garage_log="$(mktemp -t layercache-garage-install.XXXXXX.log)"
# In a process group of its own, so that a failure below stops the build with it.
setsid scripts/setup-clients.sh --garage-only >"$garage_log" 2>&1 &
garage_install=$!
trap 'kill -- "-$garage_install" 2>/dev/null || true' EXIT

scripts/setup-clients.sh --no-garage
export REQUIRE_REAL_CLIENTS=1
cargo test --release --workspace --all-targets --no-run

if ! wait "$garage_install"; then
  echo "installing Garage failed:" >&2
  tail -30 "$garage_log" >&2
  exit 1
fi
trap - EXIT
cat "$garage_log"
rm -f "$garage_log"
# The tests take about 20 minutes on 2 cores. A test that hangs fails the run here, named
# by the harness's "has been running for over 60 seconds" above, rather than holding it
# past any limit: `timeout` ends the whole process group, test binaries included.
tests_limit=45m
status=0
timeout --kill-after=30s "$tests_limit" cargo test --release --workspace --all-targets || status=$?
case "$status" in
  0) ;;
  124 | 137) echo "the tests were still running after $tests_limit and were stopped" >&2; exit "$status" ;;
  *) exit "$status" ;;
esac

# Then a bounded coverage-guided run of every fuzz target (a few minutes; fails on a crash).
scripts/fuzz.sh --ci
