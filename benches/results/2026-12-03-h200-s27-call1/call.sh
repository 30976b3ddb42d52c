#!/usr/bin/env bash
# Session 27 call 1: the backward with TMA loads (loads = tma) checked (quick matrices at 64, 128,
# 256, both dtypes, deterministic, sanitizers) and timed against its cp.async twin; the default
# backward's full check matrix at 128 (N = 1, 64, 4097, which the quick matrices leave out).
set -u
C=$PWD/.carry; R=/tmp/r1; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p1 && tar xJf $C/ptx-s27c1.tar.xz -C /tmp/p1 && export SBGEN_PTX_DIR=/tmp/p1/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r1; }
N=$C/bin/sbgen
CS=/usr/local/cuda/bin/compute-sanitizer
# The default backward schedules with loads = tma (the flags replace Schedule::DEFAULT's fields).
T128="--block-m 128 --warps 8 --softplus linear --mma wgmma --loads tma"
T64="--softplus linear --mma wgmma --loads tma"
T256="--block-m 128 --block-n 32 --warps 8 --mma wgmma --loads tma"
SAN="check --pass bwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --deterministic off,on"
run tests 90 env SBGEN_REQUIRE_GPU=1 $C/gpu --test-threads=1
run check-tma128 150 $N check --quick --pass bwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --deterministic off,on $T128 --failures-only
run check-tma64 60 $N check --quick --pass bwd --head-dim 64 --dtype bf16,f16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 --regime random,sharp --remainder return --mask strict $T64 --failures-only
run check-tma256 50 $N check --quick --pass bwd --head-dim 256 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 --regime random,sharp --remainder return --mask strict $T256 --failures-only
run check-tma128-s3 40 $N check --quick --pass bwd --head-dim 128 --dtype f16 --layout bhnd,thd --varlen 0,17,1000 --stages 3 --remainder return $T128 --failures-only
run racecheck-tma 50 $CS --tool racecheck $N $SAN --kv-groups 1 $T128
run synccheck-tma 20 $CS --tool synccheck $N $SAN --kv-groups 4 $T128
run memcheck-tma 20 $CS --tool memcheck $N $SAN --kv-groups 4 $T128
# Backward = (forward + backward) - forward of the same run; the forward takes the same flags.
for i in 1 2; do
  run bench-cp128-$i 15 $N bench --shapes 2,16,8192,128 --early-exit off --reps 30 ${T128/tma/cp_async}
  run bench-tma128-$i 15 $N bench --shapes 2,16,8192,128 --early-exit off --reps 30 $T128
  run bench-cp64-$i 15 $N bench --shapes 4,16,4096,64 --early-exit off --reps 30 ${T64/tma/cp_async}
  run bench-tma64-$i 15 $N bench --shapes 4,16,4096,64 --early-exit off --reps 30 $T64
done
run check-full-bwd128 170 $N check --pass bwd --head-dim 128 --dtype bf16 --seq 1,64,4097 --layout bhnd,bnhd,thd --varlen 0,1,64,4097 --kv-groups 1,4 --failures-only
run check-full-tc 45 $N check --pass fwd --head-dim 64,128 --dtype bf16 --seq 1,64,4097 --layout bhnd,thd --varlen 0,1,4097 --kv-groups 1,4 --remainder return --softplus mufu --mma wgmma --cumsum tensor_core --stages 2 --failures-only
