#!/usr/bin/env bash
# Session 25 call 1: the TMA forward of session 24 checked where it was not yet: the quick float64
# matrix at 128 wide (3 stages, bf16 and f16, three layouts, packed batches, GQA), racecheck and
# synccheck on it, and the padded head_dim 80 backward.
set -u
C=$PWD/.carry; R=/tmp/r1; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r1; }
N=$C/bin/sbgen
W="--mma wgmma --softplus linear --loads tma --stages 3"
run check-tma128-bf16 120 $N check --quick --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 $W --failures-only
run check-tma128-f16 120 $N check --quick --pass fwd --head-dim 128 --dtype f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 $W --failures-only
run racecheck-tma128 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 4 $W
run synccheck-tma128 60 /usr/local/cuda/bin/compute-sanitizer --tool synccheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd --kv-groups 1 $W
run check-bwd80 100 $N check --quick --pass bwd --head-dim 80 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --failures-only
