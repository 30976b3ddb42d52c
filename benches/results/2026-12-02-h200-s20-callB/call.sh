#!/usr/bin/env bash
# Session 20 call B (one H200): the linear stick with a warp-uniform fallback (one vote per block):
# checks against float64, timings against the MUFU walk in the same call, then `sbgen tune` of the
# bf16/f16 BHND forward and backward at head_dim 64 and 128 (MUFU and linear candidates) into a copy
# of the shipped cache.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/sbgen
F="--failures-only"
L="--softplus linear"
W="--mma wgmma"
run c-fwd 45 $S check --pass fwd --head-dim 64,128 --dtype bf16 --seq 17,1000 --layout bhnd,thd --varlen 0,1,17,1000 --remainder return --regime random,long_reach,sharp $W $L $F
run c-bwd 45 $S check --pass bwd --head-dim 128 --dtype f16 --seq 17,1000 --layout bhnd --remainder return --regime random,long_reach,sharp --block-m 128 --warps 8 --deterministic off,on $W $L $F
run rc-mix 50 python3 $C/dev/run_check.py $S --flags "--softplus linear" --q-scale 1.6
run rc-w 30 python3 $C/dev/run_check.py $S --flags "--softplus linear --mma wgmma"
T="--early-exit off --reps 20"
run t-lin64 20 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W $L --block-m 64 --block-n 64 --warps 4
run t-mufu64 20 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W --block-m 64 --block-n 64 --warps 4
run t-lin128 20 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W $L --block-m 128 --block-n 64 --warps 8
run t-mufu128 20 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W --block-m 128 --block-n 64 --warps 8
run t-lin256 20 $S bench --shapes 1,16,8192,256 $T $W $L --block-m 64 --block-n 32 --warps 4
run t-mufu256 20 $S bench --shapes 1,16,8192,256 $T $W --block-m 64 --block-n 32 --warps 4
run t-lin64s3 20 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W $L --block-m 64 --block-n 64 --warps 4 --stages 3
run ncu-lin 40 /usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:sb_fwd --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis $S bench --shapes 2,16,8192,128 --early-exit off --reps 20 --fwd-only $W $L --block-m 64 --block-n 64 --warps 4
cp $C/default-cache.json $R/default-cache.json
run tune 280 $S tune --gpu sm_90 --pass fwd,bwd --head-dim 128,64 --dtype bf16,f16 --budget-s 250 --cache $R/default-cache.json
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
