#!/usr/bin/env bash
# Session 19 call D (one H200): the defaults after this session (forward and backward on wgmma on
# sm_90a) next to the baselines in the same call, then `sbgen tune` of the bf16 BHND backward at
# head_dim 64 and 128 (every candidate checked against float64 first) into a copy of the shipped cache.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
run bench 40 $S bench --shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 --early-exit off --json $R/bench.json
run baselines 150 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
cp $C/default-cache.json $R/default-cache.json
run tune 200 $S tune --gpu sm_90 --pass bwd --head-dim 128,64 --dtype bf16 --budget-s 140 --cache $R/default-cache.json
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
