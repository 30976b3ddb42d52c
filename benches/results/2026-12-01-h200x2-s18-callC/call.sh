#!/usr/bin/env bash
# Session 18 call C (nvidia-h200-x2): the segment pass (context parallelism's forward walk) on wgmma
# at its default schedule on sm_90a, as the single-GPU forward: segment_check over session 16's matrix
# (every rank on GPU 0; o, rem and the gradients against float64 and one GPU), compute-sanitizer
# memcheck and racecheck on it, the NCCL ring on two GPUs, then `sbgen bench --gpus 2` again.
set -u
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1; env | grep ^NCCL >> $R/env.txt
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$C/bin/segment_check
run c1 40 $S --backward --seq 4097 --ranks 2 --scheme zigzag --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --mask strict --remainder return --data long --seed 21
run c2 40 $S --backward --seq 4097 --ranks 3 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 64 --dtype f16 --layout bnhd --mask attend_current --remainder fuse --data long --seed 22
run c3 40 $S --backward --seq 4097 --ranks 8 --scheme contiguous --heads 2 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bnhd --remainder fuse --early-exit 24 --data normal --seed 23
run c5 40 $S --backward --seq 17 --ranks 4 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --dtype bf16 --layout bhnd --data long --seed 25
run c6 40 $S --backward --seq 3001 --batch 2 --ranks 2 --scheme zigzag --heads 4 --kv-heads 4 --head-dim 64 --dtype bf16 --layout bnhd --data long --seed 26
run c7 60 $S --backward --seq 65536 --ranks 2 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 32 --seed 27
run c9 40 $S --backward --seq 4097 --ranks 6 --scheme zigzag --heads 2 --kv-heads 2 --head-dim 256 --dtype bf16 --layout bhnd --remainder fuse --data long --seed 29
run c10 40 $S --seq 1000 --ranks 5 --scheme zigzag --heads 3 --kv-heads 3 --head-dim 128 --dtype f16 --layout bhnd --mask attend_current --data long --seed 30
run memcheck 60 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S --seq 300 --ranks 3 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --layout bnhd --remainder fuse --rows 16
run racecheck 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck $S --seq 300 --ranks 3 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --layout bhnd --rows 16
run initcheck 60 /usr/local/cuda/bin/compute-sanitizer --tool initcheck $S --seq 300 --ranks 2 --scheme contiguous --heads 2 --kv-heads 1 --head-dim 64 --layout bhnd --early-exit 16 --data normal --rows 16
run x1 40 $C/bin/ring_check --ranks 2 --backward --seq 4097 --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 64 --seed 31
run b2 300 $C/bin/sbgen bench --gpus 2 --reps 20 --json $R/b2.json
cd $OUT && tar czf results.tgz r && cp r/steps.txt . ; rm -rf r
