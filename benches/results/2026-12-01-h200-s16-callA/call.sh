#!/usr/bin/env bash
# Session 16 call A (one H200): `sbgen bench --gpus 1` (the whole ring path on one rank, checked
# against float64 and the single GPU), ring_check after it moved onto sbgen_dist::driver, and the
# refusal of more GPUs than the host has.
set -u
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1; shift; local t0=$SECONDS; timeout 300 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=.carry/bin/sbgen
run b1 $S bench --gpus 1 --shapes 1,4,8192,128 --kv-heads 2 --layout bnhd --reps 20 --json $R/b1.json
run b2 $S bench --gpus 2 --shapes 1,4,8192,128
run c1 .carry/bin/ring_check --ranks 1 --backward --seq 4097 --heads 4 --kv-heads 2 --head-dim 128 --data long --rows 32 --time --reps 3
run b3 $S bench --gpus 1 --reps 20 --json $R/b3.json
cd $OUT && tar czf results.tgz r && rm -rf r
