#!/usr/bin/env bash
# Coverage-guided fuzzing of everything layercache parses from clients, with AFL++ (from
# Debian's afl++ package) driving the targets of fuzz/ built with SanitizerCoverage.
#
#   scripts/fuzz.sh [--ci | --long] [TARGET...]
#
#   --ci    (default) every target briefly, two at a time, from a fresh output directory:
#           FUZZ_SECONDS (default 25) per target.
#   --long  each target FUZZ_SECONDS (default 600), two at a time, resuming the corpus
#           a previous long run left in target/fuzz-out/.
#
# Starts from fuzz/corpus/<target>/. Fails, naming each input, when a target crashed
# (a panic, a failed property, a 5xx, a hang inside a request): the inputs are in
# target/fuzz-out/<target>/default/crashes/. Replay one with
#   FUZZ_TARGET=<target> target/x86_64-unknown-linux-gnu/fuzz/fuzz_target <input>
# and, once fixed, commit it under fuzz/regressions/<target>/ so `cargo test` replays it.
# Without AFL++ (and no way to install it) it skips, except under CI=true, where it fails.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=ci
targets=()
for arg in "$@"; do
    case "$arg" in
        --ci) mode=ci ;;
        --long) mode=long ;;
        -h | --help)
            sed -n '2,18p' "$0"
            exit 0
            ;;
        -*)
            echo "unknown option $arg" >&2
            exit 2
            ;;
        *) targets+=("$arg") ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(app twirp authorization manifest names endpoint range blocklist)
fi
if [ "$mode" = ci ]; then
    seconds="${FUZZ_SECONDS:-25}"
else
    seconds="${FUZZ_SECONDS:-600}"
fi
jobs="${FUZZ_JOBS:-2}"
afl_lib="${AFL_LIB_DIR:-/usr/lib/afl}"

skip_or_fail() {
    if [ "${CI:-}" = true ]; then
        echo "fuzz: $1" >&2
        exit 1
    fi
    echo "fuzz: $1; skipped" >&2
    exit 0
}

if ! command -v afl-fuzz >/dev/null || [ ! -f "$afl_lib/libAFLDriver.a" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "fuzz: installing afl++"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq afl++ >/dev/null ||
            { apt-get update -qq && apt-get install -y -qq afl++ >/dev/null; } ||
            skip_or_fail "afl++ cannot be installed"
    fi
    command -v afl-fuzz >/dev/null && [ -f "$afl_lib/libAFLDriver.a" ] ||
        skip_or_fail "afl-fuzz and $afl_lib/libAFLDriver.a are needed (Debian package afl++)"
fi

started=$SECONDS
# A target triple keeps the wrapper's flags off build scripts and procedural macros.
triple="$(rustc -vV | sed -n 's/^host: //p')"
echo "fuzz: building the targets"
RUSTC_WRAPPER="$PWD/scripts/fuzz-rustc.sh" AFL_LIB_DIR="$afl_lib" \
    cargo build --quiet --profile fuzz --target "$triple" -p fuzz --features afl --bin fuzz_target
binary="target/$triple/fuzz/fuzz_target"
echo "fuzz: built in $((SECONDS - started))s; ${seconds}s per target ($mode), $jobs at a time"

export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_FAST_CAL=1
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_IGNORE_UNKNOWN_ENVS=1
export RUST_BACKTRACE=0

run_target() {
    local target="$1"
    local out="target/fuzz-out/$target"
    local resume=()
    if [ "$mode" = ci ]; then
        rm -rf "$out"
    elif [ -d "$out/default/queue" ]; then
        resume=(env AFL_AUTORESUME=1)
    fi
    mkdir -p "$out"
    # -t: per input, above the harness's own 10 s limit per request, so that a request
    # stuck past that limit is reported as a crash with its message.
    "${resume[@]}" env FUZZ_TARGET="$target" afl-fuzz -i "fuzz/corpus/$target" -o "$out" \
        -V "$seconds" -t 30000 -m none -- "$binary" >"$out/log" 2>&1 || true
}

pids=()
for target in "${targets[@]}"; do
    [ -d "fuzz/corpus/$target" ] || { echo "fuzz: no corpus for $target" >&2; exit 2; }
    run_target "$target" &
    pids+=($!)
    if [ ${#pids[@]} -ge "$jobs" ]; then
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

failed=0
for target in "${targets[@]}"; do
    out="target/fuzz-out/$target/default"
    stats="$out/fuzzer_stats"
    if [ ! -f "$stats" ]; then
        echo "fuzz: $target did not start; its log:" >&2
        tail -20 "target/fuzz-out/$target/log" >&2 || true
        failed=1
        continue
    fi
    stat() { sed -n "s/^$1 *: //p" "$stats"; }
    printf 'fuzz: %-14s %10s execs  %8s execs/s  %5s paths  %s crashes  %s hangs\n' \
        "$target" "$(stat execs_done)" "$(stat execs_per_sec)" "$(stat corpus_count)" \
        "$(stat saved_crashes)" "$(stat saved_hangs)"
    for crash in "$out"/crashes/id:*; do
        [ -e "$crash" ] || continue
        echo "fuzz: CRASH in $target: $crash" >&2
        failed=1
    done
    for hang in "$out"/hangs/id:*; do
        [ -e "$hang" ] || continue
        echo "fuzz: slow input in $target (over 30 s): $hang" >&2
    done
done
echo "fuzz: done in $((SECONDS - started))s"
if [ "$failed" != 0 ]; then
    echo "fuzz: replay a crash with FUZZ_TARGET=<target> $binary <input>" >&2
    exit 1
fi
