#!/usr/bin/env bash
# Session 19 call A (one H200): the backward's S = Q K^T, dP = dO V^T and dQ += dZ K on wgmma (dK, dV
# still mma.sync). Checks against float64 first (every schedule timed below), sanitizers, then
# forward + backward timings next to the mma.sync backward.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
W="--pass bwd --mma wgmma --failures-only"
run k0 60 $S check --head-dim 128 --dtype bf16 --seq 17,1000 --block-n 32 $W
run k1 120 $S check --head-dim 64,128 --dtype bf16,f16 --seq 17,1000 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --deterministic off,on --block-n 32 $W
run k2 60 $S check --head-dim 64,128 --dtype bf16 --seq 17,4097 --early-exit off,24 --block-n 64 --stages 3 $W
run k3 60 $S check --head-dim 256 --dtype bf16,f16 --seq 17,1000 --block-m 64 --block-n 32 --warps 4 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 $W
run k4 40 $S check --head-dim 128 --dtype bf16 --seq 4097 --layout bnhd --mask attend_current --remainder fuse --block-m 128 --block-n 32 --warps 8 $W
run san 90 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S check --pass bwd --head-dim 128 --dtype bf16 --seq 300 --regime random --block-n 32 --mma wgmma --deterministic off,on
run race 120 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $S check --pass bwd --head-dim 64 --dtype bf16 --seq 200 --regime random --block-n 64 --mma wgmma
T="--early-exit off --reps 20"
run t-def 40 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T
for v in "64 32 2" "64 64 2" "64 32 3" "64 64 3"; do set -- $v
  for m in mma_sync wgmma; do run t-$m-$1-$2-$3 40 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T --mma $m --block-m $1 --block-n $2 --stages $3; done; done
run t256 60 $S bench --shapes 1,16,8192,256 $T --mma wgmma --block-m 64 --block-n 32 --stages 2
run t256d 60 $S bench --shapes 1,16,8192,256 $T
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
