#!/usr/bin/env bash
# Session 26 call 1 (binary of aa76af6, no kernel change since session 25): the full forward check
# matrix at 128 on the default (the producer kernel), the 128-wide THD and BNHD forward cache entries
# re-tuned with the producer candidates (bf16), and the one-warpgroup producer kernel (64 x 64 x 2)
# with early exit against the cp.async default.
set -u
C=$PWD/.carry; R=/tmp/r1; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p1 && tar xJf $C/ptx-s26c1.tar.xz -C /tmp/p1 && export SBGEN_PTX_DIR=/tmp/p1/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r1; }
N=$C/bin/sbgen
WS1="--mma wgmma --softplus linear --loads producer --block-m 64 --warps 4 --stages 2"
cp sbgen/default-cache.json $R/cache.json
run check-full-fwd128 240 $N check --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000,4097 --kv-groups 1,4 --failures-only
run tune-thd 100 $N tune --gpu sm_90 --cache $R/cache.json --head-dim 128 --dtype bf16 --pass fwd --layout thd --budget-s 70
run tune-bnhd 100 $N tune --gpu sm_90 --cache $R/cache.json --head-dim 128 --dtype bf16 --pass fwd --layout bnhd --budget-s 70
run tune-bnhd-fuse 100 $N tune --gpu sm_90 --cache $R/cache.json --head-dim 128 --dtype bf16 --pass fwd --layout bnhd --remainder fuse --budget-s 70
xz -T4 -c $R/cache.json > $OUT/cache.json.xz; rm -f $R/cache.json
run check-ws1-ee 40 $N check --quick --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 --early-exit 24 $WS1 --failures-only
run bench-ee-default 30 $N bench --shapes 2,16,8192,128 --fwd-only --early-exit 24 --reps 30
run bench-ee-ws1 30 $N bench --shapes 2,16,8192,128 --fwd-only --early-exit 24 --reps 30 $WS1
run bench-ee-default2 30 $N bench --shapes 2,16,8192,128 --fwd-only --early-exit 24 --reps 30
