#!/usr/bin/env bash
# Builds, here (no GPU needed), the macro's GPU checks into .carry/ (ignored by git), with the
# default-schedule PTX embedded by #[stick_breaking_attention] (the GPU machine has no CUDA toolchain,
# so the macro's CUDA-source fallback could not be compiled there):
#
#   .carry/sb-layer        examples/sb-layer (release): a layer's forward + backward vs the float64 reference
#   .carry/launch-bench    benches/benches/launch.rs (criterion): the macro's launch path
#
# The PTX comes from `sbgen tune --compile-only --emit-ptx` (the default schedule is always a
# candidate) and reaches the macro through SBGEN_PTX_DIR. A tuned cache, when given
# (SBGEN_CACHE=/abs/path/sbgen-tune.json), takes precedence for the specs and arches it has.
# Then, on the GPU machine: SBGEN_REQUIRE_GPU=1 .carry/sb-layer; .carry/launch-bench --bench
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/env.sh
out="$root/.carry"
ptx="$out/macro-ptx"
mkdir -p "$out"
rm -rf "$ptx"
echo "--- PTX for sb-layer (head_dim 64, bf16) and the launch bench (head_dim 128, bf16), sm_90a"
cargo run --release -j2 -p sbgen -- tune --gpu sm_90 --compile-only --emit-ptx "$ptx" -j 2 --head-dim 64,128 --dtype bf16
export SBGEN_PTX_DIR="$ptx"
echo "--- sb-layer"
cargo build --release -j2 -p sb-layer
cp target/release/sb-layer "$out/sb-layer"
"$out/sb-layer" | grep '^embedded' # the kernels it carries: PTX for sm_90a and the source fallback
echo "--- launch bench"
bench=$(cargo bench -j2 -p sbgen-benches --bench launch --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "launch":
        print(m["executable"])' | tail -n 1)
[ -n "$bench" ] || { echo "error: could not find the launch bench binary" >&2; exit 1; }
cp "$bench" "$out/launch-bench"
strip "$out/sb-layer" "$out/launch-bench" 2>/dev/null || true
ls -la "$out/sb-layer" "$out/launch-bench"
