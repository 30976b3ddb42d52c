#!/usr/bin/env bash
# Session 18 call E (nvidia-h200-x2): issue #14's forward at 1,16,524288,128 bf16 (strict, bhnd,
# zig-zag) on the NCCL ring of 2 H200s against one, checked against float64 (sampled rows) and the
# single GPU (every element) before its times count; without early exit (long-reach data) and with
# (T = 24, N(0,1) data). Forward only: call D's forward + backward runs at this length ran past their
# time limits on the host side (inputs, the float64 walk, the element-wise comparisons).
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; env | grep ^NCCL >> $R/env.txt
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
X="$C/bin/ring_check --ranks 2 --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --rows 2 --time"
run f512k 230 $X --seq 524288 --data long --reps 1 --seed 51
run fe512k 110 $X --seq 524288 --data normal --early-exit 24 --reps 3 --seed 52
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
