#!/bin/bash
# Session 13, call 1: sbgen-candle's GPU path on the H200. The GPU tests (forward, gradients from o
# and rem, packed batch, KV-cache decode contiguous and paged, refusals) against the float64
# reference; compute-sanitizer memcheck on them; the candle op's overhead over the raw launcher at
# 2,16,8192,128; examples/candle-lm trained at seq 2048 with the softmax and naive-SB comparisons.
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
B=$(mktemp -d); tar xJf $C/gpu-bins.tar.xz -C $B
# The CUDA libraries candle links (cuBLAS, cuRAND, NVRTC, the runtime): the toolkit's, else pip's.
D=$( (for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
        find /usr/local/cuda/lib64/ /usr/local/cuda/targets/ /usr/local/lib/ /usr/lib/ -name "$l" 2>/dev/null | head -1 | xargs -r dirname
      done) | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=${D}/usr/local/cuda/lib64
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > $R/env.txt; ldd $B/gpu | grep -E 'cuda|cublas|curand|nvrtc|not found' >> $R/env.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> $R/env.txt
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
S gpu-tests 240 $B/gpu --test-threads 1 --nocapture
# (the CPU tests run on the build machine)
S overhead 180 $B/overhead 2 16 8192 128 20
S overhead-64 120 $B/overhead 4 16 4096 64 20
S candle-lm 420 $B/candle-lm --device cuda --seq 2048 --batch 4 --d-model 512 --heads 8 --layers 6 --steps 300 --lr 2e-3 \
   --compare --compare-steps 10 --generate 400 --target-loss 1.5 --json $R/candle-lm.json
S san-memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 9 $B/gpu --test-threads 1 kv_cache packed
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; grep -E "test result|panicked|overhead|ERROR SUMMARY|trained|tokens/s|sbgen |softmax |naive-sb |failed|Error" $f | head -12; done
