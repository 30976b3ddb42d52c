#!/usr/bin/env bash
# Session 17 call L (one H200): forward and forward + backward of the defaults (the forward on wgmma,
# Q K^T and P V) next to the baselines in the same call, and the rest of the head_dim 256 default
# forward's check (f16, packed and GQA included).
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
run bench 60 $S bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --json $R/bench.json
run baselines 150 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run k256 100 $S check --pass fwd --head-dim 256 --dtype f16 --seq 17,1000 --layout bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --regime random,long_reach --failures-only
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
