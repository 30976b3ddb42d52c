#!/usr/bin/env bash
# Session 16 call B (one H200): the segment walks launched `fresh` (the query segment's first pair
# writes the row state without reading it; the states start NaN), ring buffers kept between passes
# and the own K/V sent in place: segment_check over the call-A matrix of session 15, sanitizers, the
# NCCL ring on one rank, and `bench --gpus 1` at 1,16,131072,128 again (fixed costs before/after).
set -u
R=$OUT/r; mkdir -p $R
B=.carry/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1; shift; local t0=$SECONDS; timeout 200 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$B/segment_check
run c1 $S --backward --seq 4097 --ranks 2 --scheme zigzag --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --mask strict --remainder return --data long --seed 11
run c2 $S --backward --seq 4097 --ranks 3 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 64 --dtype f16 --layout bnhd --mask attend_current --remainder fuse --data long --seed 12
run c3 $S --backward --seq 4097 --ranks 8 --scheme contiguous --heads 2 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bnhd --remainder fuse --early-exit 24 --data normal --seed 13
run c4 $S --backward --seq 1000 --ranks 5 --scheme zigzag --heads 3 --kv-heads 3 --head-dim 80 --dtype f16 --layout bhnd --data long --seed 14
run c5 $S --backward --seq 17 --ranks 4 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --dtype bf16 --layout bhnd --data long --seed 15
run c6 $S --backward --seq 3001 --batch 2 --ranks 2 --scheme zigzag --heads 4 --kv-heads 4 --head-dim 64 --dtype bf16 --layout bnhd --data long --seed 16
run c7 $S --backward --seq 65536 --ranks 2 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 96 --seed 17
run c8 $S --backward --seq 65536 --ranks 4 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bnhd --early-exit 24 --data normal --rows 64 --seed 18
run c9 $S --backward --seq 4097 --ranks 6 --scheme zigzag --heads 2 --kv-heads 2 --head-dim 256 --dtype bf16 --layout bhnd --remainder fuse --data long --seed 19
run memcheck /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S --backward --seq 300 --ranks 3 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --layout bnhd --remainder fuse --rows 16
run racecheck /usr/local/cuda/bin/compute-sanitizer --tool racecheck $S --backward --seq 300 --ranks 3 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --layout bhnd --rows 16
run initcheck /usr/local/cuda/bin/compute-sanitizer --tool initcheck $S --seq 300 --ranks 2 --scheme contiguous --heads 2 --kv-heads 1 --head-dim 128 --layout bhnd --early-exit 16 --data normal --rows 16
run r1 $B/ring_check --ranks 1 --backward --seq 4097 --heads 4 --kv-heads 2 --head-dim 128 --data long --rows 32 --time --reps 3
run b3 $B/sbgen bench --gpus 1 --reps 20 --json $R/b3.json
cd $OUT && tar czf results.tgz r && rm -rf r
