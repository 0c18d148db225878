#!/usr/bin/env bash
# fuzz/run.sh - build the libFuzzer targets and run each for a bounded time.
#
#     bash fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 10); TARGETs among reply, caps, body,
# session (default: all four). Needs clang with libFuzzer (Debian: the
# clang package; -fsanitize=fuzzer). Every target is built with
# AddressSanitizer (LeakSanitizer included) and UBSan, no recovery.
#
# Each run starts from a scratch copy of fuzz/corpus/TARGET and
# fuzz/regressions/TARGET (so clang's sanitizers see every old finding
# again), so the tree is never modified; FUZZ_MERGE=1 merges what the run found back into
# fuzz/corpus/TARGET (only inputs that add coverage). FUZZ_WORK=DIR keeps
# the build and the run's corpora there (default: a temporary directory,
# removed at exit). CC=... picks the compiler (default clang).
#
# A finding stops the script with a non-zero status after printing the
# input (path and base64). Turn it into a regression test by copying the
# input into fuzz/regressions/TARGET/ with a name that says what it was:
# tests/test_fuzz_regressions.py replays that directory and the corpus
# under ASan and UBSan in the ordinary test suite.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
seconds=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(reply caps body session)
cc=${CC:-clang}

if [ -n "${FUZZ_WORK:-}" ]; then
    work=$FUZZ_WORK
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

flags=(-std=c11 -Wall -Wextra -Werror -D_POSIX_C_SOURCE=200809L -g -O1
       -fno-omit-frame-pointer -fsanitize=address,undefined
       -fno-sanitize-recover=all -I"$root/include" -I"$root/csrc" -I"$here")

# The library once, with coverage for the fuzzer but without its main().
mkdir -p "$work/obj"
objs=()
for src in "$root"/csrc/*.c; do
    obj="$work/obj/$(basename "${src%.c}").o"
    "$cc" "${flags[@]}" -fsanitize=fuzzer-no-link -c "$src" -o "$obj"
    objs+=("$obj")
done

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

for t in "${targets[@]}"; do
    src="$here/fuzz_$t.c"
    [ -f "$src" ] || { echo "fuzz/run.sh: no target $t" >&2; exit 2; }
    exe="$work/fuzz_$t"
    "$cc" "${flags[@]}" -fsanitize=fuzzer "$src" "${objs[@]}" -lssl -lcrypto -lunbound -lresolv \
        -lpthread -o "$exe"
    corpus="$work/corpus-$t"
    mkdir -p "$corpus" "$work/crashes"
    cp "$here/corpus/$t"/* "$corpus"/ 2>/dev/null || true
    cp "$here/regressions/$t"/* "$corpus"/ 2>/dev/null || true
    echo "== fuzz_$t: ${seconds}s from $(ls "$corpus" | wc -l) seed inputs"
    status=0
    "$exe" -max_total_time="$seconds" -timeout=10 -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$work/crashes/$t-" \
        "$corpus" > "$work/fuzz_$t.log" 2>&1 || status=$?
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' \
        "$work/fuzz_$t.log" || true
    if [ "$status" -ne 0 ]; then
        tail -60 "$work/fuzz_$t.log"
        for f in "$work/crashes/$t-"*; do
            [ -f "$f" ] || continue
            echo "fuzz_$t: finding $f"
            [ "$(stat -c %s "$f")" -gt 4096 ] || echo "base64: $(base64 -w0 "$f")"
        done
        exit 1
    fi
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
        "$exe" -merge=1 "$here/corpus/$t" "$corpus" > "$work/merge_$t.log" 2>&1
        echo "merged into fuzz/corpus/$t: $(ls "$here/corpus/$t" | wc -l) inputs"
    fi
done
