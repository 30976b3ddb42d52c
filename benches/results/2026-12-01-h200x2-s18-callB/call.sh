#!/usr/bin/env bash
# Session 18 call B (nvidia-h200-x2): `sbgen bench --gpus 2` at its default problem 1,16,131072,128
# (bf16, strict, bhnd, zig-zag; early exit off and 24 on N(0,1) data): the ring checked against
# float64 and one GPU, then two GPUs against one, the transfers timed alone.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; env | grep ^NCCL >> $R/env.txt
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
run b2 540 $C/bin/sbgen bench --gpus 2 --reps 20 --json $R/b2.json
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
