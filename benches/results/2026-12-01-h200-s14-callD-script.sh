#!/bin/bash
# Session 14, call D: the BNHD decode (sbgen-candle's contiguous SbKvCache) tuned into a copy of the
# default cache as committed in c1531f1; sbgen-candle's GPU tests and candle-lm's generation with it.
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && xz -T4 -k $R/cache.json; rm -f $R/cache.json; tar czf results.tgz r' EXIT
B=$(mktemp -d); tar xJf $C/gpu-bins.tar.xz -C $B
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2> $R/$name.err; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
cp sbgen/default-cache.json $R/cache.json
S tune-decode-bnhd 300 $B/sbgen tune --gpu sm_90 --pass decode --head-dim 64,128 --dtype bf16,f16 --layout bnhd --seq 8192,32768 --budget-s 0 --cache $R/cache.json
SBGEN_CACHE=$R/cache.json S gpu-tests 200 $B/gpu --test-threads 1 --nocapture
LM="--device cuda --seq 2048 --batch 4 --d-model 512 --heads 8 --layers 6 --steps 300 --lr 2e-3 --generate 400 --target-loss 1.5"
SBGEN_CACHE=$R/cache.json S lm-decode-tuned 150 $B/candle-lm $LM --json $R/lm-decode-tuned.json
cat $R/steps.txt; tail -22 $R/tune-decode-bnhd.log; grep -E "test result|panicked" $R/gpu-tests.log; grep -E "step    0|trained|generated" $R/lm-decode-tuned.log
