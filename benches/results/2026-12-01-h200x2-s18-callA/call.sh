#!/usr/bin/env bash
# Session 18 call A (nvidia-h200-x2): issue #13's last checks on two H200s over NCCL: the ring's
# gradients against float64 at N = 65536 (GQA), N = 4097 with GQA in other specs, and `sbgen bench
# --gpus 2` at 1,16,131072,128 (transfers timed alone); then compute-sanitizer on the sm_90a wgmma
# forward as it ships (MUFU default and --softplus half), which session 17 did not sanitize.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; nvidia-smi topo -m >> $R/env.txt 2>&1; nproc >> $R/env.txt; env | grep ^NCCL >> $R/env.txt
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
B=$C/bin
run g1 60 $B/ring_check --ranks 2 --backward --seq 4097 --heads 8 --kv-heads 2 --head-dim 64 --dtype f16 --layout bnhd --mask attend_current --remainder fuse --data long --rows 64 --seed 81
run g2 60 $B/ring_check --ranks 2 --backward --seq 4097 --heads 6 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --early-exit 24 --data normal --rows 64 --seed 82
run g3 60 $B/ring_check --ranks 2 --backward --seq 4097 --batch 2 --heads 4 --kv-heads 2 --head-dim 256 --dtype bf16 --layout bhnd --scheme contiguous --data long --rows 64 --seed 83
run f64 240 $B/ring_check --ranks 2 --backward --f64-backward --seq 65536 --heads 2 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 32 --seed 84
run mem 90 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $B/sbgen check --pass fwd --head-dim 64,128 --dtype bf16 --seq 17,300 --early-exit off,24 --failures-only
run memhalf 60 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $B/sbgen check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --softplus half --failures-only
run init 60 /usr/local/cuda/bin/compute-sanitizer --tool initcheck $B/sbgen check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --early-exit off,24 --failures-only
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
