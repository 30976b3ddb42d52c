#!/usr/bin/env bash
# Session 16 call F (one H200): the sm_90a forward's new default (Q K^T on wgmma, 64 x 64 x 2) over
# every forward spec of `check --quick`, then timed next to the old mma.sync defaults and the
# baselines (torch SDPA flash / cuDNN, fla-core's Triton stick-breaking) in the same call.
set -u
C=$PWD/.carry  # (baselines.py and the fla-core wheel copied there); R=$OUT/r; mkdir -p $R
B=$C/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$B/sbgen
run check 200 $S check --quick --pass fwd --failures-only
run bench 120 $S bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --json $R/bench.json
run old128 60 $S bench --shapes 2,16,8192,128 --early-exit off --fwd-only --mma mma_sync --block-m 64 --block-n 64 --stages 3
run old64 60 $S bench --shapes 4,16,4096,64 --early-exit off --fwd-only --mma mma_sync --block-m 64 --block-n 32 --stages 2
run baselines 200 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
cd $OUT && tar czf results.tgz r && rm -rf r
