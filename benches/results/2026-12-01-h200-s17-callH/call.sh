#!/usr/bin/env bash
# Session 17 call H (one H200): P V on wgmma (register A = the weights, B = the V tile read MN-major
# through a descriptor) in the sm_90a forward. Checks against float64 (the default and the other
# wgmma tilings), memcheck, timings next to mma.sync and the baselines, and Nsight Compute profiles
# of the wgmma default and the mma.sync kernel at 2,16,8192,128.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
B=$C/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$B/sbgen
W="--mma wgmma --failures-only"
run k0 60 $S check --pass fwd --head-dim 128 --dtype bf16 --seq 17,1000 --failures-only
run k1 150 $S check --quick --pass fwd --head-dim 64,128 --failures-only
run k2 100 $S check --pass fwd --head-dim 64,128 --dtype bf16,f16 --seq 17,1000 --layout bhnd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --block-m 64 --block-n 64 --stages 3 $W
run k3 40 $S check --pass fwd --head-dim 64,128 --dtype bf16 --seq 17,4097 --early-exit off,24 --block-m 64 --block-n 32 --stages 3 $W
run k4 40 $S check --pass fwd --head-dim 128 --dtype bf16 --seq 4097 --layout bnhd --mask attend_current --remainder fuse --block-m 128 --block-n 64 --stages 2 $W
run san 60 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --block-m 64 --block-n 64 --stages 3 --mma wgmma
run race 120 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $S check --pass fwd --head-dim 64 --dtype bf16 --seq 200 --regime random --block-m 64 --block-n 64 --stages 2 --mma wgmma
T="--fwd-only --early-exit off --reps 20"
SH="--shapes 2,16,8192,128 4,16,4096,64"
run t-def 30 $S bench $SH $T --json $R/t-def.json
for v in "64 64 3" "64 32 3" "64 32 2" "128 64 2" "128 32 3"; do set -- $v
  run t-w-$1-$2-$3 30 $S bench $SH $T --mma wgmma --block-m $1 --block-n $2 --stages $3; done
run t-w-poly 30 $S bench $SH $T --mma wgmma --block-m 64 --block-n 64 --stages 2 --softplus poly
run t-old128 30 $S bench --shapes 2,16,8192,128 $T --mma mma_sync --block-m 64 --block-n 64 --stages 3
run t-old64 30 $S bench --shapes 4,16,4096,64 $T --mma mma_sync --block-m 64 --block-n 32 --stages 2
NCU="/usr/local/cuda/bin/ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section InstructionStats -k regex:sb_fwd --launch-skip 12 --launch-count 1"
run ncu-wgmma 120 $NCU $S bench --shapes 2,16,8192,128 $T --sets 1
run ncu-mma 120 $NCU $S bench --shapes 2,16,8192,128 $T --sets 1 --mma mma_sync --block-m 64 --block-n 64 --stages 3
run baselines 200 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
cd $OUT && tar czf results.tgz r && rm -rf r
