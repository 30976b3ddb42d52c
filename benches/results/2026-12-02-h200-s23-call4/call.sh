#!/usr/bin/env bash
# Session 23 call 4: the BHND 64/128 forward re-tuned with the new binary (the summary's mma.sync
# default column; the forward's PTX is unchanged, its source hash is not); the BNHD and THD backward
# entries at 64/128 re-tuned (older mma.sync winners until now).
set -u
C=$PWD/.carry; R=/tmp/r4; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p4 && tar xJf $C/ptx-c4.tar.xz -C /tmp/p4 && export SBGEN_PTX_DIR=/tmp/p4/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r4; }
N=$C/bin/sbgen
cp sbgen/default-cache.json $R/default-cache.json
T="--gpu sm_90 --cache $R/default-cache.json"
run tune-fwd 85 $N tune $T --head-dim 64,128 --pass fwd --budget-s 60
run tune-bnhd-bwd 105 $N tune $T --head-dim 64,128 --layout bnhd --remainder return --pass bwd --budget-s 80
run tune-thd-bwd 105 $N tune $T --head-dim 64,128 --layout thd --remainder return --pass bwd --budget-s 80
