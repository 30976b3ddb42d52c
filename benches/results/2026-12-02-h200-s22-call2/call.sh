#!/usr/bin/env bash
# Session 22 call 2: the backward's checks against float64 (prebuilt PTX), then the default cache's
# stale and untimed entries re-tuned (prebuilt PTX of every candidate): the BHND 64/128 forward and
# backward and the deterministic backward (the linear stick changed), the wgmma forwards at 256 and
# in BNHD/THD (recompiled untimed in session 21).
set -u
C=$PWD/.carry; R=/tmp/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p && tar xJf $C/ptx-all.tar.xz -C /tmp/p && export SBGEN_PTX_DIR=/tmp/p/ptx
ls /tmp/p/ptx | wc -l > $R/ptx-count.txt
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r; }
N=$C/bin/sbgen
run check-bwd 90 $N check --quick --pass bwd --head-dim 64,128 --dtype bf16,f16 --layout bhnd,thd --varlen 0,17,1000 --failures-only
cp sbgen/default-cache.json $R/default-cache.json
T="--gpu sm_90 --cache $R/default-cache.json"
run tune-bhnd 230 $N tune $T --head-dim 64,128 --dtype bf16,f16 --budget-s 210
run tune-det 40 $N tune $T --head-dim 128 --dtype bf16 --pass bwd --deterministic --budget-s 30
run tune-256 40 $N tune $T --head-dim 256 --pass fwd --budget-s 30
run tune-bnhd 55 $N tune $T --head-dim 64,128 --layout bnhd --remainder return --pass fwd --budget-s 45
run tune-thd 55 $N tune $T --head-dim 64,128 --layout thd --remainder return --pass fwd --budget-s 45
run tune-fuse 55 $N tune $T --head-dim 64,128 --layout bnhd --remainder fuse --pass fwd --budget-s 45
