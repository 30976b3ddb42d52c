#!/usr/bin/env bash
# Session 16 call C (one H200): gradients of the segment kernels (every rank simulated on one GPU:
# the kernels the ring runs) against the blocked float64 reference at N = 12289 and 65536, GQA.
set -u
R=$OUT/r; mkdir -p $R
B=.carry/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; nproc >> $R/env.txt
run() { local name=$1; shift; local t0=$SECONDS; timeout 500 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$B/segment_check
run g1 $S --backward --f64-backward --seq 12289 --ranks 2 --scheme zigzag --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bnhd --data long --rows 32 --seed 31
run g2 $S --backward --f64-backward --seq 65536 --ranks 2 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 64 --seed 32
cd $OUT && tar czf results.tgz r && rm -rf r
