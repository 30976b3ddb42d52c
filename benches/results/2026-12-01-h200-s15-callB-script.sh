#!/usr/bin/env bash
# Session 15 call B: per-rank compute time of the segment pass at 1,16,131072,128 bf16 on one H200,
# against the single-GPU forward (each run also re-checks its result first).
set -u
R=$OUT/r; mkdir -p $R
S=.carry/bin/segment_check
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $R/env.txt 2>&1
run() { local name=$1; shift; local t0=$SECONDS; "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
common=(--seq 131072 --heads 16 --kv-heads 16 --head-dim 128 --dtype bf16 --layout bhnd --rows 4 --time)
run t2 $S "${common[@]}" --ranks 2 --scheme zigzag --data long --reps 5 --seed 21
run t2c $S "${common[@]}" --ranks 2 --scheme contiguous --data long --reps 3 --seed 22
run t2ee $S "${common[@]}" --ranks 2 --scheme zigzag --data normal --early-exit 24 --reps 5 --seed 23
run t4 $S "${common[@]}" --ranks 4 --scheme zigzag --data long --reps 3 --seed 24
run t8 $S "${common[@]}" --ranks 8 --scheme zigzag --data long --reps 3 --seed 25
cd $OUT && tar czf results.tgz r && rm -rf r
