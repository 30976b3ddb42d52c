#!/usr/bin/env bash
# Session 22 call 1: the linear stick with one reciprocal per run (sb_walk.cuh) against the
# session-21 binary in the same call, next to the baselines; a Nsight Compute profile of the 64-wide
# forward; the forward's and the deterministic backward's checks against float64 (prebuilt PTX); compute-sanitizer.
set -u
C=$PWD/.carry; R=/tmp/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p && tar xzf $C/ptx.tar.gz -C /tmp/p && export SBGEN_PTX_DIR=/tmp/p/ptx
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r; }
N=$C/bin/sbgen; O=$C/bin/sbgen-s21
B="--shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 --early-exit off --reps 20"
run bench-prev1 45 $O bench $B
run bench-new1 45 $N bench $B --json $R/bench.json
run baselines 160 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run bench-new2 40 $N bench $B
run bench-prev2 25 $O bench $B --fwd-only
run ncu-fwd64 40 /usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:sb_fwd --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats --section Occupancy $N bench --shapes 4,16,4096,64 --early-exit off --reps 20 --fwd-only
run check-fwd 100 $N check --quick --pass fwd --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --failures-only
run check-det 45 $N check --quick --pass bwd --head-dim 128,64 --dtype bf16 --deterministic on --mask strict --failures-only
run memcheck 30 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --head-dim 128,64 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --deterministic off,on
