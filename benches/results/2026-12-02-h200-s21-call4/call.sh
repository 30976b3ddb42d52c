#!/usr/bin/env bash
# Session 21 call 4 (final): the new defaults (the linear stick's weight as e times the product,
# three CTAs per SM for the 64-wide linear wgmma backward) against the binary of commit e588945 in
# the same call, next to the baselines; the check matrix from prebuilt PTX; compute-sanitizer; a
# Nsight Compute profile of the 128-wide forward.
set -u
C=$PWD/.carry; R=/tmp/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p && tar xzf $C/ptx.tar.gz -C /tmp/p && export SBGEN_PTX_DIR=/tmp/p/ptx
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r; }
N=$C/bin/sbgen; O=$C/bin/sbgen-e588945
B="--shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 --early-exit off --reps 20"
run bench-prev1 45 $O bench $B
run bench-new1 30 $N bench $B --json $R/bench.json
run bench-prev2 30 $O bench $B
run bench-new2 30 $N bench $B
run baselines 160 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run check 150 $N check --quick --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --failures-only
run check-other 40 $N check --quick --head-dim 256,96,32 --dtype bf16 --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --failures-only
run check-det 35 $N check --quick --pass bwd --head-dim 128,64 --dtype bf16 --deterministic on --mask strict --failures-only
run memcheck 30 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --head-dim 128,64 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --deterministic off,on
run ncu-fwd 45 /usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:sb_fwd --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats --section Occupancy $N bench --shapes 2,16,8192,128 --early-exit off --reps 20 --fwd-only
