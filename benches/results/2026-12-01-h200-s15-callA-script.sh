#!/usr/bin/env bash
# Session 15 call A: the segment pass (context parallelism) on one H200: correctness of every rank's
# launches against the float64 walk and the single-GPU forward, compute-sanitizer, and the per-rank
# compute time at 1,16,131072,128 against the single-GPU forward.
set -u
R=$OUT/r; mkdir -p $R
B=.carry/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $R/env.txt 2>&1
echo "steps" > $R/steps.txt
run() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > $R/$name.log 2>&1; local rc=$?; echo "$name rc=$rc $(echo "$(date +%s.%N) - $t0" | bc) s: $*" >> $R/steps.txt; }
S=$B/segment_check
run c1 $S --seq 4097 --ranks 2 --scheme zigzag --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --mask strict --remainder return --data long --seed 11
run c2 $S --seq 4097 --ranks 3 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 64 --dtype f16 --layout bnhd --mask attend_current --remainder fuse --data long --seed 12
run c3 $S --seq 4097 --ranks 8 --scheme contiguous --heads 2 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bnhd --remainder fuse --early-exit 24 --data normal --seed 13
run c4 $S --seq 1000 --ranks 5 --scheme zigzag --heads 3 --kv-heads 3 --head-dim 80 --dtype f16 --layout bhnd --data long --seed 14
run c5 $S --seq 17 --ranks 4 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --dtype bf16 --layout bhnd --data long --seed 15
run c6 $S --seq 3001 --batch 2 --ranks 2 --scheme zigzag --heads 4 --kv-heads 4 --head-dim 64 --dtype bf16 --layout bnhd --data long --seed 16
run c7 $S --seq 65536 --ranks 2 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 96 --seed 17
run c8 $S --seq 65536 --ranks 4 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bnhd --early-exit 24 --data normal --rows 64 --seed 18
run c9 $S --seq 4097 --ranks 6 --scheme zigzag --heads 2 --kv-heads 2 --head-dim 256 --dtype bf16 --layout bhnd --remainder fuse --data long --seed 19
run memcheck /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S --seq 300 --ranks 3 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --layout bnhd --remainder fuse --rows 16
run racecheck /usr/local/cuda/bin/compute-sanitizer --tool racecheck $S --seq 300 --ranks 3 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --layout bhnd --rows 16
run initcheck /usr/local/cuda/bin/compute-sanitizer --tool initcheck $S --seq 300 --ranks 2 --scheme contiguous --heads 2 --kv-heads 1 --head-dim 128 --layout bhnd --early-exit 16 --data normal --rows 16
run t2 $S --seq 131072 --ranks 2 --scheme zigzag --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 24 --time --reps 5 --seed 21
run t2c $S --seq 131072 --ranks 2 --scheme contiguous --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 8 --time --reps 3 --seed 22
run t2ee $S --seq 131072 --ranks 2 --scheme zigzag --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data normal --early-exit 24 --rows 8 --time --reps 5 --seed 23
run t8 $S --seq 131072 --ranks 8 --scheme zigzag --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 8 --time --reps 3 --seed 24
cd $OUT && tar czf results.tgz r && rm -rf r
