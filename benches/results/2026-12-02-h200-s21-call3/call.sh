#!/usr/bin/env bash
# Session 21 call 3: three CTAs per SM at head_dim 64 (the kernels compiled with __launch_bounds__
# min blocks 3, PTX in .carry/pd-mb3: the 64 x 64 x 3 wgmma forward and the default backward)
# against the same kernels at min blocks 1, same call; the new binary's check matrix. The PTX in
# .carry/pd-mb3 was compiled here (NVRTC, same options as sbgen) from `sbgen emit` output with its
# `MIN_BLOCKS = 1` line set to 3, under the file names `sbgen check --emit-ptx` gives the unedited kernels.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
N=$C/bin/sbgen; P="--ptx-dir $C/pd-mb3"
B="--shapes 4,16,4096,64 2,16,8192,64 --early-exit off --reps 20"
F="--shapes 4,16,4096,64 2,16,8192,64 --early-exit off --reps 20 --fwd-only --mma wgmma --softplus linear --stages 3"
run b64-def1 30 $N bench $B
run b64-mb3-1 30 $N bench $B $P
run f64-s3-1 30 $N bench $F
run f64-s3mb3-1 30 $N bench $F $P
run b64-def2 30 $N bench $B
run b64-mb3-2 30 $N bench $B $P
run f64-s3-2 30 $N bench $F
run f64-s3mb3-2 30 $N bench $F $P
run check-mb3-bwd 40 $N check --pass bwd --head-dim 64 --dtype bf16 --mask strict --remainder return --layout bhnd --early-exit off $P
run check-mb3-fwd 40 $N check --pass fwd --head-dim 64 --dtype bf16 --mask strict --remainder return --layout bhnd --early-exit off --mma wgmma --softplus linear --stages 3 $P
run check 230 $N check --quick --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --failures-only
cd $OUT && tar czf r.tgz r && rm -rf r
