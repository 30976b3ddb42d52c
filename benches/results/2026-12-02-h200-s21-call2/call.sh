#!/usr/bin/env bash
# Session 21 call 2: the pipelined wgmma forward + folded K/V tile offsets and wgmma descriptors
# (fewer instructions per step) against the previous binary, same call; checks against float64.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
N=$C/bin/sbgen; O=$C/bin/sbgen-old
B="--shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 --early-exit off --reps 20"
run bench-old1 40 $O bench $B
run bench-new1 40 $N bench $B
run bench-old2 40 $O bench $B
run bench-new2 40 $N bench $B
run check 150 $N check --quick --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --failures-only
run check256 60 $N check --quick --head-dim 256,96,32 --dtype bf16 --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --failures-only
run checkdet 40 $N check --quick --pass bwd --head-dim 128,64 --dtype bf16 --deterministic on --mask strict --failures-only
run memcheck 60 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --head-dim 128,64 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --deterministic off,on
cd $OUT && tar czf r.tgz r && rm -rf r
