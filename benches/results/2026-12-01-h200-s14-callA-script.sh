#!/bin/bash
# Session 14, call A: tune candle's specs (BNHD and THD with the remainder returned) into a copy of the
# shipped default cache, then sbgen-candle's GPU tests with that cache (SBGEN_CACHE).
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
B=$(mktemp -d); tar xJf $C/gpu-bins.tar.xz -C $B
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2> $R/$name.err; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $R/env.txt
cp sbgen/default-cache.json $R/cache.json
S tune-bnhd 280 $B/sbgen tune --gpu sm_90 --head-dim 64,128 --dtype bf16,f16 --layout bnhd --remainder return --budget-s 120 --cache $R/cache.json
S tune-thd 280 $B/sbgen tune --gpu sm_90 --head-dim 64,128 --dtype bf16,f16 --layout thd --remainder return --budget-s 120 --cache $R/cache.json
SBGEN_CACHE=$R/cache.json S gpu-tests 200 $B/gpu --test-threads 1 --nocapture
cat $R/steps.txt; for f in $R/tune*.log; do echo "--- $f"; tail -30 $f; done; grep -E "test result|panicked" $R/gpu-tests.log
