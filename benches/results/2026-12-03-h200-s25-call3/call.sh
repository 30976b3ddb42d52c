#!/usr/bin/env bash
# Session 25 call 3: the new 128-wide forward default (a producer warpgroup, 128 x 64 x 3) checked
# (quick float64 matrix, racecheck on it and on the one-warpgroup variant), timed next to the
# baselines in one run, in THD and BNHD against the cp.async kernel, profiled against the cp.async
# kernel with Nsight Compute, and the 128-wide BHND forward re-tuned with the producer candidates.
set -u
C=$PWD/.carry; R=/tmp/r3; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p3 && tar xJf $C/ptx-s25c3.tar.xz -C /tmp/p3 && export SBGEN_PTX_DIR=/tmp/p3/ptx
pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl > $R/pip.log 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r3; }
N=$C/bin/sbgen
CP="--mma wgmma --softplus linear --stages 3"
run racecheck-ws 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 1
run racecheck-ws1 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 1 --mma wgmma --softplus linear --loads producer --block-m 64 --warps 4 --stages 2
run racecheck-pp 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 1 --mma wgmma --softplus linear --loads producer --block-m 128 --warps 8 --stages 3 --pingpong
run synccheck-ws 40 /usr/local/cuda/bin/compute-sanitizer --tool synccheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 4 --early-exit off,24
run check-default128 90 $N check --quick --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --failures-only
B="bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30"
run bench-default1 40 $N $B --json $R/bench.json
run baselines 160 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run bench-default2 40 $N $B
run bench-cp128 20 $N bench --shapes 2,16,8192,128 --fwd-only --early-exit off --reps 30 $CP
for L in thd bnhd; do
  run bench-$L-ws 20 $N bench --shapes 2,16,8192,128 --layout $L --fwd-only --early-exit off --reps 30
  run bench-$L-cp 20 $N bench --shapes 2,16,8192,128 --layout $L --fwd-only --early-exit off --reps 30 $CP
done
NCU="/usr/local/cuda/bin/ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section InstructionStats -k regex:sb_fwd --launch-skip 12 --launch-count 1"
run ncu-ws 90 $NCU $N bench --shapes 2,16,8192,128 --fwd-only --early-exit off --reps 20 --sets 1
run ncu-cp 90 $NCU $N bench --shapes 2,16,8192,128 --fwd-only --early-exit off --reps 20 --sets 1 $CP
cp sbgen/default-cache.json $R/default-cache.json
run tune-fwd128 200 $N tune --gpu sm_90 --cache $R/default-cache.json --head-dim 128 --pass fwd --budget-s 165
