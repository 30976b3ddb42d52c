#!/usr/bin/env bash
# Session 25 call 4, the final producer kernels: the epilogue back on the computing warps' named
# barrier (call 3's block barrier reached at two places was divergent to synccheck) and the stop
# flag atomic (racecheck flagged its plain store and load, which the free mbarrier orders).
# Sanitizers on the default and on the producer kernels with early exit; the quick matrix; the
# defaults timed (no device time was left for the re-tune).
set -u
C=$PWD/.carry; R=/tmp/r4; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p4 && tar xJf $C/ptx-s25c4.tar.xz -C /tmp/p4 && export SBGEN_PTX_DIR=/tmp/p4/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r4; }
N=$C/bin/sbgen
CS=/usr/local/cuda/bin/compute-sanitizer
WS="--mma wgmma --softplus linear --loads producer"
S="check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300"
# Most needed first: the device time left may cut the call short.
run racecheck-default 60 $CS --tool racecheck $N $S --kv-groups 1
run synccheck-default 40 $CS --tool synccheck $N $S --kv-groups 4
run racecheck-ws-ee 60 $CS --tool racecheck $N $S --kv-groups 1 --early-exit 24 $WS --block-m 128 --warps 8 --stages 3
run check-default128 60 $N check --quick --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --failures-only
run memcheck-ws-ee 40 $CS --tool memcheck $N $S --kv-groups 4 --early-exit 24 $WS --block-m 128 --warps 8 --stages 3
run synccheck-ws-ee 40 $CS --tool synccheck $N $S --kv-groups 4 --early-exit 24 $WS --block-m 128 --warps 8 --stages 3
run racecheck-ws1 60 $CS --tool racecheck $N $S --kv-groups 1 --early-exit off,24 $WS --block-m 64 --warps 4 --stages 2
run check-ws-ee 40 $N check --quick --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 --early-exit 24 $WS --block-m 128 --warps 8 --stages 3 --failures-only
run bench-default 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30
