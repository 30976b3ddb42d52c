#!/usr/bin/env bash
# One GPU session over a bundle made by scripts/build-gpu-bundle.sh (run it from the repository root
# on the GPU machine; nothing here needs Rust or a CUDA toolchain):
#
#   bash scripts/gpu-session.sh .carry                 # all steps
#   STEPS="check" CHECK_ARGS="--quick" bash scripts/gpu-session.sh .carry
#
# Steps, in order (env STEPS, default "tests check bench baselines"):
#   tests      the GPU test binary (DIR/gpu), one test at a time, failing (not skipping) without a GPU
#   check      DIR/sbgen check $CHECK_ARGS (default: the full matrix)
#   tune       DIR/sbgen tune --gpu sm_90 --cache $OUT/sbgen-tune.json $TUNE_ARGS (default
#              "--head-dim 128 --dtype bf16", the specs the bundle has PTX for), then `cache show`
#   bench      DIR/sbgen bench --json $OUT/bench.json $BENCH_ARGS
#   baselines  python3 DIR/baselines.py --json $OUT/baselines.json $BASELINE_ARGS (same session as bench)
#   sanitize   compute-sanitizer over small runs of every kernel family (forward, backward + its finish
#              kernel; both head dims, masks, layouts, remainders, early exit off/on): memcheck with
#              leak check, racecheck, initcheck and synccheck, each over `DIR/sbgen check $SANITIZE_ARGS`
#              (default below), logs in $OUT/sanitize-<tool>.log; fails on any finding
#              (docs/checking.md#sanitizer). Only when asked for, like tune.
# Each step has a time limit (env TESTS_TIMEOUT, CHECK_TIMEOUT, TUNE_TIMEOUT, BENCH_TIMEOUT, BASELINES_TIMEOUT, in
# seconds). Logs and JSON go to $OUT (default ./gpu-out); summary.txt lists every step's exit status.
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
dir="$(cd "${1:-.carry}" && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
STEPS="${STEPS:-tests check bench baselines}"  # `tune` runs only when asked for

# The PTX folder: unpacked from the bundle into a temporary folder.
ptx_root=$(mktemp -d)
trap 'rm -rf "$ptx_root"' EXIT
if [ -f "$dir/ptx.tar.gz" ]; then
    tar xzf "$dir/ptx.tar.gz" -C "$ptx_root"
    export SBGEN_PTX_DIR="$ptx_root/ptx"
    echo "PTX: $(ls "$SBGEN_PTX_DIR" | wc -l) kernels from $dir/ptx.tar.gz"
else
    echo "warning: no $dir/ptx.tar.gz: kernels will need NVRTC on this machine" >&2
fi

{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
} > "$OUT/machine.txt"
head -n 20 "$OUT/machine.txt"

summary=()
failed=0
step() {
    local name="$1" limit="$2"
    shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "=== $name: timed out after $limit s" | tee -a "$OUT/$name.log"
    summary+=("$name: exit $rc in $((SECONDS - t0)) s")
    [ "$rc" = 0 ] || failed=1
}

for s in $STEPS; do
    case "$s" in
        tests) SBGEN_REQUIRE_GPU=1 step tests "${TESTS_TIMEOUT:-300}" "$dir/gpu" --test-threads=1 --nocapture ;;
        # shellcheck disable=SC2086
        check) step check "${CHECK_TIMEOUT:-540}" "$dir/sbgen" check ${CHECK_ARGS:-} ;;
        # shellcheck disable=SC2086
        tune)
            step tune "${TUNE_TIMEOUT:-300}" "$dir/sbgen" tune --gpu sm_90 --cache "$OUT/sbgen-tune.json" \
                ${TUNE_ARGS:---head-dim 128 --dtype bf16}
            "$dir/sbgen" cache show --cache "$OUT/sbgen-tune.json" --candidates > "$OUT/cache-show.txt" 2>&1 ;;
        # shellcheck disable=SC2086
        bench) step bench "${BENCH_TIMEOUT:-540}" "$dir/sbgen" bench --json "$OUT/bench.json" ${BENCH_ARGS:-} ;;
        # shellcheck disable=SC2086
        baselines) step baselines "${BASELINES_TIMEOUT:-540}" python3 "$dir/baselines.py" --json "$OUT/baselines.json" ${BASELINE_ARGS:-} ;;
        sanitize)
            # Small shapes: every launch and module load runs instrumented (10-100x slower). bf16 only
            # (f16 differs in conversions alone). memcheck and initcheck take every head dim, mask,
            # layout, remainder and early-exit setting; racecheck and synccheck (shared memory and
            # barriers, which the layout does not touch) one layout.
            sanitizer="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
            small="--seq 17,200 --regime random --seed 1 --dtype bf16"
            for tool in memcheck initcheck racecheck synccheck; do
                case "$tool" in
                    memcheck) extra="--leak-check full"; sel="${SANITIZE_ARGS:-$small}" ;;
                    initcheck) extra=""; sel="${SANITIZE_ARGS:-$small}" ;;
                    *) extra=""; sel="${SANITIZE_ARGS:-$small --layout bhnd}" ;;
                esac
                # shellcheck disable=SC2086
                step "sanitize-$tool" "${SANITIZE_TIMEOUT:-240}" "$sanitizer" --tool "$tool" $extra \
                    --error-exitcode 3 --print-limit 50 "$dir/sbgen" check --failures-only $sel
                grep -h "ERROR SUMMARY\|LEAK SUMMARY\|RACECHECK SUMMARY" "$OUT/sanitize-$tool.log" | sed "s/^/  $tool: /"
            done
            # The launcher's own paths (refused views, module store, macro-free launches) under memcheck.
            # Skipped: the test that asks for more memory than the card has on purpose (the sanitizer
            # reports that failed allocation as an API error; the `tests` step runs it).
            SBGEN_REQUIRE_GPU=1 step sanitize-tests "${SANITIZE_TIMEOUT:-240}" "$sanitizer" --tool memcheck \
                --leak-check full --error-exitcode 3 --print-limit 50 "$dir/gpu" --test-threads=1 \
                --skip backward_workspace_allocation_failure_is_a_typed_error
            grep -h "ERROR SUMMARY\|LEAK SUMMARY" "$OUT/sanitize-tests.log" | sed "s/^/  tests: /" ;;
        *) echo "unknown step \`$s\`: allowed tests, check, tune, bench, baselines, sanitize" >&2; failed=1 ;;
    esac
done

printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit "$failed"
