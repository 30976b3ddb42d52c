#!/usr/bin/env bash
# Session 15 call C: the segment backward (context parallelism) on one H200: every rank's backward
# launches against the float64 reference backward and the single-GPU backward, compute-sanitizer,
# and the per-rank time at 1,16,131072,128 against the single-GPU backward.
set -u
R=$OUT/r; mkdir -p $R
S=.carry/bin/segment_check
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $R/env.txt 2>&1
run() { local name=$1; shift; local t0=$SECONDS; timeout 300 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
run b1 $S --backward --seq 2049 --ranks 2 --scheme zigzag --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 64 --seed 31
run b2 $S --backward --seq 2049 --ranks 3 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 64 --dtype f16 --layout bnhd --mask attend_current --remainder fuse --data long --rows 64 --seed 32
run b3 $S --backward --seq 2049 --ranks 8 --scheme contiguous --heads 2 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bnhd --remainder fuse --early-exit 24 --data normal --rows 64 --seed 33
run b4 $S --backward --seq 1000 --ranks 5 --scheme zigzag --heads 3 --kv-heads 3 --head-dim 80 --dtype f16 --layout bhnd --data long --rows 64 --seed 34
run b5 $S --backward --seq 17 --ranks 4 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --dtype bf16 --layout bhnd --data long --seed 35
run b6 $S --backward --seq 1500 --batch 2 --ranks 2 --scheme zigzag --heads 4 --kv-heads 2 --head-dim 256 --dtype bf16 --layout bnhd --data long --rows 64 --seed 36
run b7 $S --backward --seq 4097 --ranks 4 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --data normal --rows 64 --seed 37
run b8 $S --backward --seq 65536 --ranks 2 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 32 --seed 38
run memcheck /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S --backward --seq 300 --ranks 3 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --layout bnhd --remainder fuse --rows 16
run racecheck /usr/local/cuda/bin/compute-sanitizer --tool racecheck $S --backward --seq 300 --ranks 2 --scheme zigzag --heads 2 --kv-heads 1 --head-dim 64 --layout bhnd --rows 16
common=(--backward --seq 131072 --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --rows 2 --time)
run tb2 $S "${common[@]}" --ranks 2 --scheme zigzag --data long --reps 3 --seed 41
run tb4 $S "${common[@]}" --ranks 4 --scheme zigzag --data long --reps 3 --seed 42
cd $OUT && tar czf results.tgz r && rm -rf r
