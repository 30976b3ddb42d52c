#!/usr/bin/env bash
# Session 25 call 2: warp specialisation (loads = producer) and ping-pong, first run. Each new kernel
# family checked against the float64 reference before it is timed; memcheck, racecheck and synccheck
# on the ping-pong kernel; then the forward timed against the session-24 defaults (cp.async) and the
# TMA twins, in the same call.
set -u
C=$PWD/.carry; R=/tmp/r2; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p2 && tar xJf $C/ptx-s25c2.tar.xz -C /tmp/p2 && export SBGEN_PTX_DIR=/tmp/p2/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r2; }
N=$C/bin/sbgen
W="--mma wgmma --softplus linear --loads producer"
PP128="$W --block-m 128 --warps 8 --stages 3 --pingpong"
run smoke 30 $N check --pass fwd --head-dim 128 --dtype bf16 --layout bhnd --seq 300 --regime random $PP128
run check-pp128 120 $N check --quick --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 $PP128 --failures-only
run check-ws128-f16 60 $N check --quick --pass fwd --head-dim 128 --dtype f16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1 $W --block-m 128 --warps 8 --stages 3 --failures-only
run check-ws64 60 $N check --quick --pass fwd --head-dim 64 --dtype bf16 --layout bhnd,thd --varlen 0,1,17,1000 --kv-groups 1,4 $W --block-m 64 --warps 4 --stages 2 --failures-only
run check-pp64 40 $N check --quick --pass fwd --head-dim 64 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1 $W --block-m 128 --warps 8 --stages 3 --pingpong --failures-only
run memcheck 40 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 4 $PP128
run racecheck 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --kv-groups 1 $PP128
run synccheck 40 /usr/local/cuda/bin/compute-sanitizer --tool synccheck $N check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd --kv-groups 1 $PP128
B128="bench --shapes 2,16,8192,128 --fwd-only --early-exit off,24 --reps 30"
B64="bench --shapes 4,16,4096,64 --fwd-only --early-exit off,24 --reps 30"
run b128-default 30 $N $B128
run b128-tma 30 $N $B128 --mma wgmma --softplus linear --loads tma --stages 3
run b128-ws-m128s3 30 $N $B128 $W --block-m 128 --warps 8 --stages 3
run b128-pp-m128s3 30 $N $B128 $PP128
run b128-pp-m128s4 30 $N $B128 $W --block-m 128 --warps 8 --stages 4 --pingpong
run b128-ws-m128s4 30 $N $B128 $W --block-m 128 --warps 8 --stages 4
run b128-ws-m128s2 30 $N $B128 $W --block-m 128 --warps 8 --stages 2
run b128-ws-m64s2 30 $N $B128 $W --block-m 64 --warps 4 --stages 2
run b128-pp-n32 30 $N $B128 $W --block-m 128 --warps 8 --stages 3 --block-n 32 --pingpong
run b64-default 30 $N $B64
run b64-ws-m64s2 30 $N $B64 $W --block-m 64 --warps 4 --stages 2
run b64-ws-m128s2 30 $N $B64 $W --block-m 128 --warps 8 --stages 2
run b64-ws-m128s3 30 $N $B64 $W --block-m 128 --warps 8 --stages 3
run b64-pp-m128s3 30 $N $B64 $W --block-m 128 --warps 8 --stages 3 --pingpong
run b64-pp-m128s4 30 $N $B64 $W --block-m 128 --warps 8 --stages 4 --pingpong
run b128-default2 30 $N $B128
