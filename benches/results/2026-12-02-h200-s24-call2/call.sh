#!/usr/bin/env bash
# Session 24 call 2: the TMA loads of the wgmma forward (loads = tma) checked against float64
# (both pipelines: 2 stages, 3 stages with the overlap), under memcheck, and timed against their
# cp.async twins (the defaults) in one run, alternating.
set -u
C=$PWD/.carry; R=/tmp/r2; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p2 && tar xJf $C/ptx-s24c2.tar.xz -C /tmp/p2 && export SBGEN_PTX_DIR=/tmp/p2/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r2; }
N=$C/bin/sbgen
W="--mma wgmma --softplus linear --loads tma"
run check-tma3 120 $N check --pass fwd --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --seq 17,64,1000,4097 --kv-groups 1,4 $W --stages 3 --failures-only
run check-tma2 120 $N check --pass fwd --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --seq 17,64,1000,4097 --kv-groups 1,4 $W --stages 2 --failures-only
run memcheck 90 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --pass fwd --head-dim 128,64 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 1,4 $W --stages 3
B128="bench --shapes 2,16,8192,128 --fwd-only --early-exit off,24 --reps 30"
B64="bench --shapes 4,16,4096,64 --fwd-only --early-exit off,24 --reps 30"
run bench128-cp1 40 $N $B128
run bench128-tma1 40 $N $B128 $W --stages 3
run bench64-cp1 40 $N $B64
run bench64-tma1 40 $N $B64 $W --stages 2
run bench128-cp2 40 $N $B128
run bench128-tma2 40 $N $B128 $W --stages 3
run bench64-cp2 40 $N $B64
run bench64-tma2 40 $N $B64 $W --stages 2
