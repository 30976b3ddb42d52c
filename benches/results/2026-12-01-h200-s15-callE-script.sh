#!/usr/bin/env bash
# Session 15 call E: the NCCL ring driver on the one GPU lent (one rank: no shift, a reduce over one
# rank), and segment_check again after its refactor.
set -u
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; env | grep ^NCCL >> $R/env.txt
run() { local name=$1; shift; local t0=$SECONDS; timeout 240 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
B=.carry/bin
run r1 $B/ring_check --ranks 1 --backward --seq 2049 --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 64 --seed 51
run r1f $B/ring_check --ranks 1 --backward --seq 1000 --heads 2 --kv-heads 1 --head-dim 64 --dtype f16 --layout bnhd --remainder fuse --mask attend_current --data long --rows 64 --seed 52
run s1 $B/segment_check --backward --seq 2049 --ranks 3 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 64 --dtype f16 --layout bnhd --remainder fuse --data long --rows 64 --seed 53
run rt1 $B/ring_check --ranks 1 --backward --seq 131072 --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 2 --time --reps 3 --seed 54
cd $OUT && tar czf results.tgz r && rm -rf r
