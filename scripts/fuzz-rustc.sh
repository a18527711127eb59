#!/usr/bin/env bash
# RUSTC_WRAPPER for the fuzz build (scripts/fuzz.sh): SanitizerCoverage edge guards for
# AFL++ in layercache's own crates and the parsers they hand client input to, and AFL++'s
# driver and runtime linked into the fuzz binary. Dependencies that never see client
# input stay uninstrumented, which keeps the build short and the coverage map on target.
set -euo pipefail
rustc="$1"
shift
crate=""
cross=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "--crate-name" ]; then crate="$arg"; fi
    if [ "$prev" = "--target" ]; then cross=1; fi
    prev="$arg"
done
# Only what runs in the fuzz binary (built with an explicit --target), never a build
# script or procedural macro built for the host.
if [ -z "$cross" ]; then
    exec "$rustc" "$@"
fi
afl_lib="${AFL_LIB_DIR:-/usr/lib/afl}"
case "$crate" in
    oci | store | server | fuzz | fuzz_target | serde_json | quick_xml | jsonwebtoken | base64 | percent_encoding | serde_urlencoded | matchit)
        set -- "$@" -C passes=sancov-module \
            -C llvm-args=-sanitizer-coverage-level=3 \
            -C llvm-args=-sanitizer-coverage-trace-pc-guard \
            -C llvm-args=-sanitizer-coverage-prune-blocks=0
        ;;
esac
if [ "$crate" = "fuzz_target" ]; then
    set -- "$@" -C link-arg="$afl_lib/libAFLDriver.a" -C link-arg="$afl_lib/afl-compiler-rt.o"
fi
exec "$rustc" "$@"
