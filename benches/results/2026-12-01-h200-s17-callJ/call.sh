#!/usr/bin/env bash
# Session 17 call J (one H200): the shipped cache's other forward entries re-tuned with wgmma in the
# search space (head_dim 64 and 128, bf16 and f16: BNHD fused and returned, THD returned), merged
# into the cache call I wrote.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
cp $C/default-cache.json $R/default-cache.json
T="tune --gpu sm_90 --pass fwd --head-dim 64,128 --dtype bf16,f16 --budget-s 0 --cache $R/default-cache.json"
run tune-bnhd-fuse 200 $S $T --layout bnhd --remainder fuse
run tune-bnhd-ret 200 $S $T --layout bnhd --remainder return
run tune-thd-ret 200 $S $T --layout thd --remainder return
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
