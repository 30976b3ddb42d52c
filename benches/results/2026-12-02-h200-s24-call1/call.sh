#!/usr/bin/env bash
# Session 24 call 1: the THD backward and the BNHD fused backward at 64/128 re-tuned (older mma.sync
# winners until now; session 23's THD tune was cut off by its timeout).
set -u
C=$PWD/.carry; R=/tmp/r1; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p1 && tar xJf $C/ptx-s24c1.tar.xz -C /tmp/p1 && export SBGEN_PTX_DIR=/tmp/p1/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r1; }
N=$C/bin/sbgen
cp sbgen/default-cache.json $R/default-cache.json
T="--gpu sm_90 --cache $R/default-cache.json"
run tune-thd-bwd 175 $N tune $T --head-dim 64,128 --layout thd --remainder return --pass bwd --budget-s 115
run tune-bnhd-fuse-bwd 175 $N tune $T --head-dim 64,128 --layout bnhd --remainder fuse --pass bwd --budget-s 115
