#!/usr/bin/env bash
# Session 16 call D (one H200): the forward's Q K^T on wgmma (first cut, `--mma wgmma`): checked
# against float64, then timed against mma.sync at the same tiles and the default schedule.
set -u
R=$OUT/r; mkdir -p $R
B=.carry/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1; shift; local t0=$SECONDS; timeout 240 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$B/sbgen
run k1 $S check --pass fwd --head-dim 64,128 --dtype bf16 --seq 17,1000 --mma wgmma --block-m 64 --block-n 64 --failures-only
run k2 $S check --pass fwd --head-dim 128 --dtype f16 --seq 1,300 --layout bhnd,bnhd,thd --varlen 0,1,17,300 --kv-groups 1,4 --mma wgmma --block-m 128 --block-n 64 --failures-only
run k3 $S check --pass fwd --head-dim 64,128 --dtype bf16 --seq 4097 --early-exit off,24 --mma wgmma --block-m 64 --block-n 32 --stages 3 --failures-only
run t0 $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 20
run t1 $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 20 --mma wgmma --block-m 64 --block-n 64 --stages 3
run t2 $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 20 --block-m 64 --block-n 64 --stages 3
run t3 $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 20 --mma wgmma --block-m 128 --block-n 64 --stages 2
run t4 $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 20 --mma wgmma --block-m 64 --block-n 32 --stages 3
cd $OUT && tar czf results.tgz r && rm -rf r
