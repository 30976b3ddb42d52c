#!/usr/bin/env bash
# Session 15 call G: after the review's fixes (length checks before cutting views, the ring API taking
# its partition from the rank's state, the walk's scale reaching the backward's finish): a quick rerun.
set -u
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
run() { local name=$1; shift; local t0=$SECONDS; timeout 120 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
B=.carry/bin
run s1 $B/segment_check --backward --seq 2049 --ranks 3 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bnhd --remainder fuse --data long --rows 32 --seed 71
run r1 $B/ring_check --ranks 1 --backward --seq 1500 --heads 4 --kv-heads 2 --head-dim 64 --dtype f16 --layout bhnd --data long --rows 32 --seed 72
cd $OUT && tar czf results.tgz r && rm -rf r
