#!/usr/bin/env bash
# Session 20 call A (one H200): the stick in linear space (`--softplus linear`) against the MUFU
# log-space walk: checks against float64 first, then timings of both in the same call.
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
# correctness first
run c-fwd 70 $S check --quick --pass fwd --head-dim 64,128 $W $L $F
run c-fwd-n32 40 $S check --quick --pass fwd --head-dim 128,256 --dtype bf16 --layout bhnd,thd --varlen 0,1,17,1000 --block-n 32 $W $L $F
run c-bwd128 60 $S check --quick --pass bwd --head-dim 128 --block-m 128 --warps 8 --layout bhnd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --deterministic off,on $W $L $F
run c-bwd64 40 $S check --quick --pass bwd --head-dim 64 --dtype bf16 $W $L $F
run c-mma 40 $S check --quick --head-dim 64,96 --dtype bf16 --layout bhnd,bnhd $L $F
run rc-lin 60 python3 $C/dev/run_check.py $S --flags "--softplus linear" --q-scale 2.5
run rc-lin-w 40 python3 $C/dev/run_check.py $S --flags "--softplus linear --mma wgmma" --q-scale 2.5
# timings (median of 20 reps; fwd and fwd+bwd)
T="--early-exit off --reps 20"
run t-def 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 $T
run t-lin64 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W $L --block-m 64 --block-n 64 --warps 4
run t-mufu64 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W --block-m 64 --block-n 64 --warps 4
run t-lin64s3 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W $L --block-m 64 --block-n 64 --warps 4 --stages 3
run t-lin64n32 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W $L --block-m 64 --block-n 32 --warps 4
run t-lin128 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W $L --block-m 128 --block-n 64 --warps 8
run t-mufu128 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $W --block-m 128 --block-n 64 --warps 8
run t-lin128det 30 $S bench --shapes 2,16,8192,128 $T --deterministic $W $L --block-m 128 --block-n 64 --warps 8
run t-lin256 30 $S bench --shapes 1,16,8192,256 $T $W $L --block-m 64 --block-n 32 --warps 4
run t-lin256b 30 $S bench --shapes 1,16,8192,256 $T $W $L --block-m 128 --block-n 32 --warps 8
run t-linmma 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T $L
run t-mufumma 30 $S bench --shapes 2,16,8192,128 4,16,4096,64 $T
run ncu-lin 70 /usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:sb_fwd --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section InstructionStats --section ComputeWorkloadAnalysis $S bench --shapes 2,16,8192,128 --early-exit off --reps 2 --fwd-only $W $L --block-m 64 --block-n 64 --warps 4
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
