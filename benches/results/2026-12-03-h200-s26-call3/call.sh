#!/usr/bin/env bash
# Session 26 call 3: the scan on tensor cores (cumsum = tensor_core) checked and timed against its
# shuffle twin; the 64-wide backward kernels that now take dK/dV on wgmma; the defaults next to the
# baselines. (The backward re-tune planned here was left out: two refused starts left too little
# device time.)
set -u
C=$PWD/.carry; R=/tmp/r3; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p3 && tar xJf $C/ptx-s26c3.tar.xz -C /tmp/p3 && export SBGEN_PTX_DIR=/tmp/p3/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r3; }
N=$C/bin/sbgen
TC="--mma wgmma --cumsum tensor_core --stages 2"
SH="--mma wgmma --stages 2 --softplus mufu"
run check-tc 70 $N check --quick --pass fwd --head-dim 64,128 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 --softplus mufu $TC --failures-only
run check-tc-half 40 $N check --quick --pass fwd --head-dim 128 --dtype f16 --layout bhnd --softplus half $TC --failures-only
# The 64-wide backward kernels that now take dK/dV on wgmma: the unbounded ones (one CTA per SM:
# BNHD with the remainder fused and THD with early exit, bf16; the MUFU walk).
run check-bwd64 70 $N check --quick --pass bwd --head-dim 64 --dtype bf16 --layout bnhd,thd --varlen 0,17,1000 --kv-groups 1,4 --failures-only
run check-bwd64-mufu 40 $N check --quick --pass bwd --head-dim 64 --dtype bf16 --layout bhnd --mma wgmma --softplus mufu --failures-only
run bench-tc 20 $N bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 30 --softplus mufu $TC
run bench-sh 20 $N bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 30 $SH
run bench-default 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30 --json $R/bench.json
mkdir -p /tmp/site && pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl > $R/pip.log 2>&1
run baselines 140 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run bench-default2 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30
