#!/usr/bin/env bash
# Builds, here (no GPU needed), everything a GPU session runs, into .carry/ (ignored by git):
#
#   .carry/sbgen          the CLI (release): `check`, `run`, `bench`
#   .carry/gpu            the GPU test binary (`cargo test --release -p sbgen-tests --test gpu --no-run`)
#   .carry/ptx.tar.gz     PTX of every kernel `sbgen check` (full matrix), `bench`, `run` and the GPU
#                         tests use at the default schedule, for --arch (default sm_90 = sm_90a),
#                         compiled here: NVRTC on the GPU machine (SBGEN_CUDA_HOME=/usr/local/cuda)
#                         works too but spends device time; plus the PTX
#                         of every non-spilling variant of the search space of the specs in $TUNE_SPECS
#                         (default "--head-dim 128 --dtype bf16"; fwd and bwd; several sets separated by
#                         `;`), for `sbgen tune`; plus the default kernels of each `check` selection
#                         in $CHECK_SETS (`;`-separated; none by default)
#   .carry/baselines.py   torch SDPA / fla-core baselines (from shared/bench)
#
# Then, on the GPU machine: `bash scripts/gpu-session.sh .carry` (see that script).
# Usage: scripts/build-gpu-bundle.sh [--arch sm_90|sm_80]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
arch=sm_90
if [ "${1:-}" = "--arch" ]; then arch="$2"; fi
out="$root/.carry"
source scripts/env.sh

echo "--- building release binaries"
cargo build --release -j2 -p sbgen --bin sbgen
# The test binary's path comes from cargo's JSON messages (its name carries a hash).
gpu_test=$(cargo test --release -j2 -p sbgen-tests --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -n 1)
[ -n "$gpu_test" ] || { echo "error: could not find the gpu test binary" >&2; exit 1; }

mkdir -p "$out"
cp target/release/sbgen "$out/sbgen"
cp "$gpu_test" "$out/gpu"
strip "$out/sbgen" "$out/gpu" 2>/dev/null || true

baselines=""
for candidate in "$root/../shared/bench/baselines.py" "/work/shared/bench/baselines.py"; do
    if [ -f "$candidate" ]; then baselines="$candidate"; break; fi
done
if [ -n "$baselines" ]; then cp -f "$baselines" "$out/baselines.py"; else echo "warning: baselines.py not found" >&2; fi

echo "--- compiling PTX for $arch"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$out/sbgen" check --emit-ptx "$tmp/ptx" --arch "$arch"
# More `check` selections for the bundle's PTX, separated by `;` (env CHECK_SETS), e.g. the new
# kernel families: "--head-dim 32,96,256,80 --layout bhnd,bnhd,thd --deterministic off,on". The GPU
# machine then loads PTX instead of compiling hundreds of kernels with NVRTC inside the device budget
# (a --quick check over those families timed out at 330 s that way; here the 720 kernels took 428 s).
if [ -n "${CHECK_SETS:-}" ]; then
    IFS=';' read -ra check_sets <<<"$CHECK_SETS"
    for selection in "${check_sets[@]}"; do
        echo "--- compiling the default kernels of: check $selection"
        # shellcheck disable=SC2086
        "$out/sbgen" check --emit-ptx "$tmp/ptx" --arch "$arch" $selection ||
            echo "warning: some kernels failed to compile or spill (listed above): they have no PTX" >&2
    done
fi
# Several spec sets can be given, separated by `;` (e.g. the two families of the default cache).
IFS=';' read -ra spec_sets <<<"${TUNE_SPECS:=--head-dim 128 --dtype bf16}"
for specs in "${spec_sets[@]}"; do
    echo "--- compiling the search space for sbgen tune ($specs)"
    # shellcheck disable=SC2086
    "$out/sbgen" tune --gpu "$arch" --compile-only --emit-ptx "$tmp/ptx" -j 2 $specs ||
        echo "warning: some variants failed to compile or spill: they have no PTX and tune records them as failed" >&2
done
tar czf "$out/ptx.tar.gz" -C "$tmp" ptx

echo "--- bundle"
ls -la "$out"
du -sh "$out"
