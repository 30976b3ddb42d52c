#!/usr/bin/env bash
# Session 21 call 1 (its check logs did not come back: more than 8 files under $OUT; call 1b ran them
# again): the pipelined wgmma forward (P V of block i-1 issued with Q K^T of block i+1, both
# under block i's stick math) against the previous binary, same call; its checks against float64.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
N=$C/bin/sbgen; O=$C/bin/sbgen-old
B128="--shapes 2,16,8192,128 1,16,16384,128 --fwd-only --early-exit off --reps 30"
B64="--shapes 4,16,4096,64 --fwd-only --early-exit off --reps 30 --mma wgmma --softplus linear --stages 3"
B256="--shapes 1,16,8192,256 --fwd-only --early-exit off --reps 30 --mma wgmma --block-n 32 --stages 3"
run check128 110 $N check --pass fwd --head-dim 128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --quick --failures-only
run b128-old1 25 $O bench $B128
run b128-new1 25 $N bench $B128
run b64-old 25 $O bench $B64
run b64-new 25 $N bench $B64
run b128-old2 25 $O bench $B128
run b128-new2 25 $N bench $B128
run b256-old 25 $O bench $B256
run b256-new 25 $N bench $B256
run b64-def 20 $N bench --shapes 4,16,4096,64 --fwd-only --early-exit off --reps 30
run check64 60 $N check --pass fwd --head-dim 64 --dtype bf16 --mma wgmma --softplus linear --stages 3 --quick --failures-only
run check64w8 50 $N check --pass fwd --head-dim 64 --dtype f16 --mma wgmma --block-m 128 --warps 8 --stages 3 --quick --layout bhnd,thd --varlen 1,300 --failures-only
run check256 50 $N check --pass fwd --head-dim 256 --dtype bf16 --mma wgmma --block-n 32 --stages 3 --quick --mask strict --failures-only
run memcheck 30 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --early-exit off,24
run racecheck 40 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 200 --regime random --mask strict --remainder return --layout bhnd --early-exit off

