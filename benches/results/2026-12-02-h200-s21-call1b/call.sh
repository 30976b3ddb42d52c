#!/usr/bin/env bash
# Session 21 call 1b (one H200, same machine right after call 1, whose check logs did not come back:
# more than 8 files): the checks of call 1 again, on call 1's binary (the pipelined wgmma forward).
C=$PWD/.carry; R=$OUT/r; mkdir -p $R; export LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda; N=$C/bin/sbgen
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
run check128 110 $N check --pass fwd --head-dim 128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --quick --failures-only
run check64 50 $N check --pass fwd --head-dim 64 --dtype bf16 --mma wgmma --softplus linear --stages 3 --quick --failures-only
run check64w8 40 $N check --pass fwd --head-dim 64 --dtype f16 --mma wgmma --block-m 128 --warps 8 --stages 3 --quick --layout bhnd,thd --varlen 1,300 --failures-only
run check256 40 $N check --pass fwd --head-dim 256 --dtype bf16 --mma wgmma --block-n 32 --stages 3 --quick --mask strict --failures-only
run memcheck 30 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --early-exit off,24
run racecheck 40 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 200 --regime random --mask strict --remainder return --layout bhnd --early-exit off
cd $OUT && tar czf r.tgz r && rm -rf r
