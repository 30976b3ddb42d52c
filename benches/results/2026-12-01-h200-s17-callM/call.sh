#!/usr/bin/env bash
# Session 17 call M (one H200): the polynomial exp2 without floorf/F2I (magic-number rounding) and
# branch-free, and the new `softplus = half` split (the polynomial for every other key): checked
# against float64, then timed beside the MUFU default on the wgmma forward.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
T="--fwd-only --early-exit off --reps 20"
SH="--shapes 2,16,8192,128 4,16,4096,64"
run t-mufu 30 $S bench $SH $T
run t-poly 30 $S bench $SH $T --softplus poly
run t-half 30 $S bench $SH $T --softplus half
run k-poly 50 $S check --pass fwd --head-dim 64,128 --dtype bf16 --seq 17,1000 --early-exit off,24 --softplus poly --failures-only
run k-half 50 $S check --pass fwd --head-dim 64,128 --dtype bf16 --seq 17,1000 --early-exit off,24 --softplus half --failures-only
run k-bwd 50 $S check --pass bwd --head-dim 64 --dtype bf16 --seq 17,1000 --softplus poly --failures-only
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
