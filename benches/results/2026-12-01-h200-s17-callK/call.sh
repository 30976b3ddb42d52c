#!/usr/bin/env bash
# Session 17 call K (one H200): the macro's layer (the shipped cache's wgmma forward through the
# generated launcher) against float64, the head_dim 256 forward's new default (64 x 32 on wgmma)
# over layouts, GQA and dtypes, and Nsight Compute stall reasons and pipe use of the 128-wide default.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
run layer 60 env SBGEN_REQUIRE_GPU=1 $C/bin/sb-layer
run k256 90 $S check --pass fwd --head-dim 256 --dtype bf16,f16 --seq 17,1000 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --regime random,long_reach --failures-only
NCU="/usr/local/cuda/bin/ncu --clock-control none -k regex:sb_fwd --launch-skip 12 --launch-count 1"
B="$S bench --shapes 2,16,8192,128 --fwd-only --early-exit off --reps 20 --sets 1"
run ncu-stall 60 $NCU --section WarpStateStats --print-details all $B
run ncu-pipes 60 $NCU --metrics "regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" $B
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
