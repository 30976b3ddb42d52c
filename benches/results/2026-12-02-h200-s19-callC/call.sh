#!/usr/bin/env bash
# Session 19 call C (one H200): the wgmma backward with dK/dV added four columns per reduction
# (red.global.add.v4.f32): the candidate sm_90a defaults (64 x 64 at head_dim 64, 128 x 64 on 8 warps
# at 128, 128 x 32 on 8 warps at 256) checked against float64 and under the sanitizers, then timed
# next to the mma.sync default backward in the same call.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
T="--early-exit off --reps 20"
run t-def 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 $T
run t-w128 30 $S bench --shapes 2,16,8192,128 $T --mma wgmma --block-m 128 --block-n 64 --warps 8
run t-w128-64 30 $S bench --shapes 2,16,8192,128 $T --mma wgmma --block-m 64 --block-n 64 --warps 4
run t-w64 30 $S bench --shapes 4,16,4096,64 $T --mma wgmma --block-m 64 --block-n 64 --warps 4
run t-w64-128 30 $S bench --shapes 4,16,4096,64 $T --mma wgmma --block-m 128 --block-n 64 --warps 8
run t-w256 30 $S bench --shapes 1,16,8192,256 $T --mma wgmma --block-m 128 --block-n 32 --warps 8
run t-w128-det 30 $S bench --shapes 2,16,8192,128 $T --deterministic --mma wgmma --block-m 128 --block-n 64 --warps 8
run t-def-det 30 $S bench --shapes 2,16,8192,128 $T --deterministic
F="--pass bwd --mma wgmma --failures-only"
run k128 110 $S check --head-dim 128 --dtype bf16,f16 --seq 1,17,1000 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --deterministic off,on --regime random,sharp --block-m 128 --block-n 64 --warps 8 $F
run k64 70 $S check --head-dim 64 --dtype bf16,f16 --seq 1,17,1000 --layout bhnd,thd --varlen 0,1,17,1000 --kv-groups 1,mqa --deterministic off,on --regime random,long_reach --block-m 64 --block-n 64 --warps 4 $F
run k256 70 $S check --head-dim 256 --dtype bf16 --seq 17,1000 --layout bhnd,bnhd --kv-groups 1,4 --deterministic off,on --regime random,sharp --block-m 128 --block-n 32 --warps 8 $F
run k4097 60 $S check --head-dim 64,128 --dtype bf16 --seq 4097 --early-exit off,24 --regime long_reach --block-m 128 --block-n 64 --warps 8 $F
run san 60 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S check --pass bwd --head-dim 128 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --block-m 128 --block-n 64 --warps 8 --mma wgmma --deterministic off,on --layout bhnd,thd --varlen 1,300
run race 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $S check --pass bwd --head-dim 128 --dtype bf16 --seq 200 --regime random --mask strict --remainder return --block-m 128 --block-n 64 --warps 8 --mma wgmma
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
