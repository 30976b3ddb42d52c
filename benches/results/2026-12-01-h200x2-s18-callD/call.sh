#!/usr/bin/env bash
# Session 18 call D (nvidia-h200-x2): issue #14 as far as two GPUs go: 1,16,N,128 bf16 (strict, bhnd,
# zig-zag) on the NCCL ring of 2 H200s against one, every run checked against float64 (sampled rows)
# and the single GPU (every element) before its times count: N = 524288 forward + backward without
# early exit; with early exit (T = 24, N(0,1) data) at N = 131072, 524288, 1048576 (time per token);
# the forward at N = 1048576 without early exit.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; env | grep ^NCCL >> $R/env.txt
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
X="$C/bin/ring_check --ranks 2 --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --rows 2 --time"
run o512k 250 $X --backward --seq 524288 --data long --reps 2 --seed 41
run e128k 50 $X --backward --seq 131072 --data normal --early-exit 24 --reps 5 --seed 42
run e512k 80 $X --backward --seq 524288 --data normal --early-exit 24 --reps 5 --seed 43
run e1m 120 $X --backward --seq 1048576 --data normal --early-exit 24 --reps 5 --seed 44
run o1m 90 $X --seq 1048576 --data long --reps 1 --seed 45
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
