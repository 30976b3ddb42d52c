#!/bin/bash
# Session 14, call B: what the tuned BNHD/return entries change for candle users: the op's overhead
# example and candle-lm's training step, each with the shipped cache (the default schedule through
# NVRTC for BNHD/return) and with call A's cache (SBGEN_CACHE).
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
B=$(mktemp -d); tar xJf $C/gpu-bins.tar.xz -C $B
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2> $R/$name.err; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
TUNED=$(mktemp -d)/cache-s14a.json; xz -dc $C/cache-s14a.json.xz > $TUNED
S overhead-shipped 120 $B/overhead 2 16 8192 128 30
SBGEN_CACHE=$TUNED S overhead-tuned 120 $B/overhead 2 16 8192 128 30
S overhead-64-shipped 120 $B/overhead 4 16 4096 64 30
SBGEN_CACHE=$TUNED S overhead-64-tuned 120 $B/overhead 4 16 4096 64 30
LM="--device cuda --seq 2048 --batch 4 --d-model 512 --heads 8 --layers 6 --steps 300 --lr 2e-3 --generate 400 --target-loss 1.5"
S lm-shipped 150 $B/candle-lm $LM --compare --compare-steps 10 --json $R/lm-shipped.json
SBGEN_CACHE=$TUNED S lm-tuned 150 $B/candle-lm $LM --compare --compare-steps 10 --json $R/lm-tuned.json
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; grep -E "forward|fwd\+bwd|trained|sbgen |softmax|naive|generated|peak|Error|error" $f | head -12; done
