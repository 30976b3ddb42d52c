#!/bin/bash
# Session 12, call 8: the decode kernels wider than 128 after the CI spill fix (a contiguous block
# loaded through the select form): check --pass decode at head dims 160, 192, 224, 256 (bf16; every
# mask, cache, remainder, early-exit setting; both splits; GQA 4; lengths 1, 17, 1000, 4097).
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
S() { local name=$1 lim=$2 thr=$3; shift 3; timeout -k 5 $lim "$@" --threads $thr > $R/$name.log 2>&1; echo "$name rc=$?"; }
A="--pass decode --dtype bf16 --seq 1,17,1000,4097 --kv-groups 4 --failures-only"
S dims-b 200 8 $C/sbgen check $A --head-dim 160,192 &
S dims-c 200 8 $C/sbgen check $A --head-dim 224,256 &
wait
for f in $R/*.log; do echo "--- $f"; grep -E "^check:|FAIL|error" $f | head -5; done
