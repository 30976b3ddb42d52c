#!/usr/bin/env bash
# Session 20 call C (one H200): the new defaults (the stick in linear space on the sm_90a forward at
# head_dim 64 and 128 and the backward) next to the baselines in the same call; checks of the new
# defaults against float64; `sbgen tune` of the BNHD, THD and deterministic specs into call B's cache.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
run bench 40 $S bench --shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 --early-exit off --json $R/bench.json
run baselines 160 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run check 75 $S check --quick --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --failures-only
run memcheck 25 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S check --head-dim 128,64 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --deterministic off,on
cp $C/default-cache-B.json $R/default-cache.json
run tune-bnhd 75 $S tune --gpu sm_90 --pass fwd,bwd --head-dim 128,64 --dtype bf16,f16 --layout bnhd --remainder return --budget-s 60 --cache $R/default-cache.json
run tune-fuse 65 $S tune --gpu sm_90 --pass fwd,bwd --head-dim 128,64 --dtype bf16,f16 --layout bnhd --remainder fuse --budget-s 50 --cache $R/default-cache.json
run tune-thd 65 $S tune --gpu sm_90 --pass fwd,bwd --head-dim 128,64 --dtype bf16,f16 --layout thd --remainder return --budget-s 50 --cache $R/default-cache.json
run tune-det 40 $S tune --gpu sm_90 --pass bwd --head-dim 128 --dtype bf16 --deterministic --budget-s 30 --cache $R/default-cache.json
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
