#!/usr/bin/env bash
# Session 16 call G (one H200): the wgmma forward after its epilogue waits for every warpgroup
# (__syncthreads before o is staged over the Q tile): the new default and the 8-warp variants
# checked against float64 and timed once more.
set -u
R=$OUT/r; mkdir -p $R
B=.carry/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$B/sbgen
run k1 120 $S check --quick --pass fwd --head-dim 64,128 --failures-only
run k2 60 $S check --pass fwd --head-dim 128 --dtype bf16 --seq 17,1000 --layout bhnd,thd --varlen 0,1,17,1000 --mma wgmma --block-m 128 --block-n 32 --stages 3 --failures-only
run k3 60 $S check --pass fwd --head-dim 64,128 --dtype bf16 --seq 1000 --mma wgmma --block-m 128 --block-n 64 --stages 2 --failures-only
run t1 60 $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off
cd $OUT && tar czf results.tgz r && rm -rf r
