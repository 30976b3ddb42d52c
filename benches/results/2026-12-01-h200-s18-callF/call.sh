#!/usr/bin/env bash
# Session 18 call F (one H200): what 8 GPUs can gain from the compute's split (issue #14, with no
# 8-GPU machine lent): all 8 ranks of a zig-zag ring of the wgmma segment pass run on the one GPU,
# each rank's launches timed apart, against the single-GPU forward, at 1,16,N,128 bf16 for N = 131072
# and 524288; checked against float64 (sampled rows) and the single GPU (every element) first.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
X="$C/bin/segment_check --ranks 8 --scheme zigzag --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 2 --time"
run s128k 50 $X --seq 131072 --reps 3 --seed 61
run s512k 110 $X --seq 524288 --reps 1 --seed 62
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
