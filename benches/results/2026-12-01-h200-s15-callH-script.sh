#!/usr/bin/env bash
# Session 15 call H: segment_check after it took the shared single-GPU and timing helpers.
set -u
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
run() { local name=$1; shift; local t0=$SECONDS; timeout 120 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
run s1 .carry/bin/segment_check --backward --time --reps 3 --seq 8192 --ranks 2 --scheme zigzag --heads 4 --kv-heads 2 --head-dim 128 --dtype bf16 --layout bhnd --data long --rows 32 --seed 81
cd $OUT && tar czf results.tgz r && rm -rf r
