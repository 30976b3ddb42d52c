#!/bin/bash
# Session 13, call 7: sbgen-candle's GPU tests and compute-sanitizer memcheck after the shared storage helpers
# (cuda/storage.rs) replaced their copies in attention.rs and decode.rs.
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
B=$(mktemp -d); tar xJf $C/gpu-bins.tar.xz -C $B
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
S gpu-tests 240 $B/gpu --test-threads 1 --nocapture
S san-memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 9 $B/gpu --test-threads 1
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; grep -E "test result|panicked|forward|fwd\+bwd|ERROR SUMMARY|trained|sbgen  |generated|Error" $f | head -8; done
