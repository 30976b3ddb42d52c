#!/bin/bash
# Session 13, call 2: the GPU tests after the decode test's early-exit rule was aligned with
# docs/checking.md (against the reference without early exit, within 2^-T); compute-sanitizer
# memcheck and racecheck on them; the overhead with candle's memory pool trimmed (its default) and
# kept; candle-lm once more with the same settings, to see the figures repeat.
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
B=$(mktemp -d); tar xJf $C/gpu-bins.tar.xz -C $B
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
S gpu-tests 240 $B/gpu --test-threads 1 --nocapture
S overhead 180 $B/overhead 2 16 8192 128 20
S overhead-64 120 $B/overhead 4 16 4096 64 20
S san-memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 9 $B/gpu --test-threads 1
S san-racecheck 300 compute-sanitizer --tool racecheck --error-exitcode 9 $B/gpu --test-threads 1 kv_cache packed
S candle-lm 300 $B/candle-lm --device cuda --seq 2048 --batch 4 --d-model 512 --heads 8 --layers 6 --steps 300 --lr 2e-3 \
   --compare --compare-steps 10 --generate 400 --target-loss 1.5 --json $R/candle-lm.json
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; grep -E "test result|panicked|overhead|forward|fwd\+bwd|ERROR SUMMARY|trained|sbgen  |softmax  |naive-sb  |generated|failed|Error" $f | head -12; done
