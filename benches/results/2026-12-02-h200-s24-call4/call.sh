#!/usr/bin/env bash
# Session 24 call 4: the final binary (TMA kernels prefetch their tensor maps). The 64-wide forward
# re-tuned (bf16 and f16, with the TMA twins); the TMA kernels' quick check at 64 (2 stages),
# memcheck; the default kernels and the TMA ones timed next to the
# baselines in one run.
set -u
C=$PWD/.carry; R=/tmp/r4; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p4 && tar xJf $C/ptx-s24c4.tar.xz -C /tmp/p4 && export SBGEN_PTX_DIR=/tmp/p4/ptx
pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl > $R/pip.log 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r4; }
N=$C/bin/sbgen
W="--mma wgmma --softplus linear --loads tma"
B="bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30"
run bench-default1 40 $N $B --json $R/bench.json
run bench-tma128 30 $N bench --shapes 2,16,8192,128 --fwd-only --early-exit off,24 --reps 30 $W --stages 3
run bench-tma64 30 $N bench --shapes 4,16,4096,64 --fwd-only --early-exit off,24 --reps 30 $W --stages 2
run baselines 160 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run bench-default2 40 $N $B
run bench-cp-ee 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit 24 --reps 30
cp sbgen/default-cache.json $R/default-cache.json
run tune-fwd64 90 $N tune --gpu sm_90 --cache $R/default-cache.json --head-dim 64 --pass fwd --budget-s 60
run memcheck 30 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --pass fwd --head-dim 64 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 4 $W --stages 2
run check-tma64 80 $N check --quick --pass fwd --head-dim 64 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 $W --stages 2 --failures-only
