#!/usr/bin/env bash
# Session 17 call I (one H200): the wgmma forward with P V on wgmma, final template text: checks
# against float64 (default, 3-stage overlap with GQA/varlen/f16, head_dim 256 on wgmma), then the
# shipped cache's BHND forward entries re-tuned (head_dim 64, 128, 256; wgmma now in the space).
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
W="--mma wgmma --failures-only"
cp $C/default-cache.json $R/default-cache.json
run tune-bhnd 300 $S tune --gpu sm_90 --pass fwd --head-dim 64,128,256 --dtype bf16,f16 --budget-s 0 --cache $R/default-cache.json
run k1 100 $S check --quick --pass fwd --head-dim 64,128 --failures-only
run k2 150 $S check --pass fwd --head-dim 64,128 --dtype bf16,f16 --seq 17,1000 --layout bhnd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --regime random,long_reach --block-m 64 --block-n 64 --stages 3 $W
run k5 60 $S check --pass fwd --head-dim 256 --dtype bf16 --seq 17,1000 --early-exit off,24 --block-m 64 --block-n 32 --stages 2 $W
run k6 60 $S check --pass fwd --head-dim 256 --dtype f16 --seq 1000 --layout bnhd --block-m 128 --block-n 32 --stages 3 $W
cd $OUT && tar czf results.tgz r && cp r/default-cache.json r/steps.txt . ; rm -rf r
