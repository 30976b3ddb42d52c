#!/bin/bash
# Session 12, call 7, on the final decode kernel: head dim 128 f16 (the full decode check), and the
# other tile widths (32, 96, 160, 192, 224, 256; bf16; every mask, cache, remainder and early-exit
# setting; both splits; GQA 4; lengths 1, 17, 1000, 4097). PTX compiled there by NVRTC.
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
S() { local name=$1 lim=$2 thr=$3; shift 3; timeout -k 5 $lim "$@" --threads $thr > $R/$name.log 2>&1; echo "$name rc=$?"; }
A="--pass decode --dtype bf16 --seq 1,17,1000,4097 --kv-groups 4 --failures-only"
S dec-128-f16 280 4 $C/sbgen check --pass decode --head-dim 128 --dtype f16 --failures-only &
S dims-a 280 4 $C/sbgen check $A --head-dim 32,96 &
S dims-b 280 4 $C/sbgen check $A --head-dim 160,192 &
S dims-c 280 4 $C/sbgen check $A --head-dim 224,256 &
wait
for f in $R/*.log; do echo "--- $f"; grep -E "^check:|FAIL|error" $f | head -5; done
