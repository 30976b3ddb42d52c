#!/usr/bin/env bash
# Session 27 call 3: the other 128-wide backward cache entries re-tuned over every loads choice
# (cp.async, TMA, producer): bf16 THD, BNHD, BNHD with the remainder fused, f16 BHND; then the
# defaults (the 128-wide backward now by TMA) next to the baselines; then f16 THD if time is left.
# Tuned into a copy of the shipped cache, returned xz-compressed after each tune.
set -u
C=$PWD/.carry; R=/tmp/r3; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p3 && tar xJf $C/ptx-s27c3.tar.xz -C /tmp/p3 && export SBGEN_PTX_DIR=/tmp/p3/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; local rc=$?; echo "$name rc=$rc $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r3; return $rc; }
N=$C/bin/sbgen
cp sbgen/default-cache.json $R/cache.json
T="$N tune --gpu sm_90 --cache $R/cache.json --pass bwd --head-dim 128 --budget-s 0"
run tune-bf16-thd 110 $T --dtype bf16 --layout thd; xz -T4 -c $R/cache.json > $OUT/cache.json.xz
run tune-bf16-bnhd 110 $T --dtype bf16 --layout bnhd; xz -T4 -c $R/cache.json > $OUT/cache.json.xz
run tune-bf16-bnhd-fuse 110 $T --dtype bf16 --layout bnhd --remainder fuse; xz -T4 -c $R/cache.json > $OUT/cache.json.xz
run tune-f16 110 $T --dtype f16; xz -T4 -c $R/cache.json > $OUT/cache.json.xz
run bench-default 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30 --json $R/bench.json
mkdir -p /tmp/site && pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl > $R/pip.log 2>&1
run baselines 140 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run bench-default2 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30
run tune-f16-thd 110 $T --dtype f16 --layout thd; xz -T4 -c $R/cache.json > $OUT/cache.json.xz
tar czf $OUT/r.tgz -C /tmp r3
