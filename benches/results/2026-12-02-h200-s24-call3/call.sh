#!/usr/bin/env bash
# Session 24 call 3: the BHND bf16 forward at 64/128 re-tuned with the TMA twins in the search
# space; the TMA kernels' quick check (both pipelines) run to the end.
set -u
C=$PWD/.carry; R=/tmp/r3; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p3 && tar xJf $C/ptx-s24c3.tar.xz -C /tmp/p3 && export SBGEN_PTX_DIR=/tmp/p3/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r3; }
N=$C/bin/sbgen
cp sbgen/default-cache.json $R/default-cache.json
run tune-fwd 170 $N tune --gpu sm_90 --cache $R/default-cache.json --head-dim 64,128 --dtype bf16 --pass fwd --budget-s 110
W="--mma wgmma --softplus linear --loads tma"
run check-tma3 100 $N check --quick --pass fwd --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 $W --stages 3 --failures-only
run check-tma2 100 $N check --quick --pass fwd --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 $W --stages 2 --failures-only
