#!/usr/bin/env bash
# Session 15 call F (nvidia-h200-x2): context parallelism over NCCL on two H200s: forward and
# backward checked against float64 and one GPU at N = 4097 and 65536 (GQA), then timed at
# 1,16,131072,128 bf16 against one GPU, with and without early exit.
set -u
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; nvidia-smi topo -m >> $R/env.txt 2>&1; env | grep ^NCCL >> $R/env.txt
run() { local name=$1; shift; local t0=$SECONDS; timeout 150 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
B=.carry/bin/ring_check
run x1 $B --ranks 2 --backward --seq 4097 --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 64 --seed 61
run x2 $B --ranks 2 --backward --seq 65536 --heads 4 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bnhd --data long --rows 16 --seed 62
run t $B --ranks 2 --backward --seq 131072 --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 2 --time --reps 3 --seed 63
run tee $B --ranks 2 --backward --seq 131072 --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data normal --early-exit 24 --rows 2 --time --reps 5 --seed 64
cd $OUT && tar czf results.tgz r && rm -rf r
