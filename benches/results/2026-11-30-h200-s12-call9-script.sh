#!/bin/bash
# Session 12, call 9: compute-sanitizer on the decode kernels wider than 128 after the last template
# edit (head dim 224, contiguous BHND and BNHD, GQA 4, lengths 0..300, early exit off and 24).
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
SAN="--pass decode --seq 0,1,17,300 --head-dim 224 --dtype bf16 --regime random,long_reach --kv-groups 4 --mask strict --remainder fuse --early-exit off,24 --layout bhnd,bnhd"
for tool in memcheck racecheck synccheck initcheck; do
  timeout -k 5 60 compute-sanitizer --tool $tool --error-exitcode 9 $C/sbgen check $SAN --threads 1 > $R/san-$tool.log 2>&1 &
done
wait
for f in $R/*.log; do echo "--- $f"; grep -E "^check:|SUMMARY" $f | head -3; done
