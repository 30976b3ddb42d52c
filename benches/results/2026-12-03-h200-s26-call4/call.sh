#!/usr/bin/env bash
# Session 26 call 4 (short: the device time left): compute-sanitizer on the tensor-core scan kernel
# (racecheck, synccheck: its triangle is written by the computing threads and read by wgmma), then the
# tuner over the 64-wide forward with the tensor-core candidates, N = 2048, into a scratch cache.
set -u
C=$PWD/.carry; R=/tmp/r4; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
mkdir -p /tmp/p3 && tar xJf $C/ptx-s26c3.tar.xz -C /tmp/p3 && export SBGEN_PTX_DIR=/tmp/p3/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r4; }
N=$C/bin/sbgen
CS=/usr/local/cuda/bin/compute-sanitizer
S="check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --softplus mufu --mma wgmma --cumsum tensor_core --stages 2"
run racecheck-tc 30 $CS --tool racecheck $N $S --kv-groups 1
run synccheck-tc 20 $CS --tool synccheck $N $S --kv-groups 4
run tune-fwd64 55 $N tune --gpu sm_90 --cache $R/scratch.json --head-dim 64 --dtype bf16 --pass fwd --seq 2048 --budget-s 40
rm -f $R/scratch.json $R/scratch.json.lock
