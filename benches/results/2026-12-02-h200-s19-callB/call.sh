#!/usr/bin/env bash
# Session 19 call B (one H200): the wgmma backward with 128 query rows on 8 warps (two warpgroups:
# half the dK/dV additions per query row), checked against float64, then timed next to the 64-row
# wgmma and mma.sync backwards; Nsight Compute on the 64 x 64 wgmma backward.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
T="--early-exit off --reps 20"
for v in "128 64 8" "128 32 8"; do set -- $v
  for m in wgmma mma_sync; do run t-$m-$1-$2 40 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T --mma $m --block-m $1 --block-n $2 --warps $3; done; done
run t256 40 $S bench --shapes 1,16,8192,256 $T --mma wgmma --block-m 128 --block-n 32 --warps 8
W="--pass bwd --mma wgmma --block-m 128 --block-n 64 --warps 8 --failures-only"
run k5 100 $S check --head-dim 64,128 --dtype bf16,f16 --seq 17,1000 --layout bhnd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --deterministic off,on --regime random $W
run k6 60 $S check --head-dim 64,128 --dtype bf16 --seq 4097 --early-exit off,24 --regime long_reach,sharp --deterministic off,on $W
run k7 60 $S check --head-dim 256 --dtype bf16,f16 --seq 17,1000 --block-m 128 --block-n 32 --warps 8 --pass bwd --mma wgmma --layout bnhd,thd --varlen 0,17,1000 --kv-groups 1,4 --regime random,sharp --failures-only
NCU="/usr/local/cuda/bin/ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section InstructionStats -k regex:sb_bwd_.*_[0-9a-f]{8}$ --launch-skip 6 --launch-count 1"
run ncu-wgmma 120 $NCU $S bench --shapes 2,16,8192,128 $T --mma wgmma --block-m 64 --block-n 64 --stages 2
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
