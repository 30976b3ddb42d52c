#!/bin/bash
# Session 13, call 4: the final sbgen-candle binaries. The GPU tests; the candle op's overhead over
# the raw launcher (memory pool trimmed, the driver's default, and kept); candle-lm with the pool
# kept (its default now) and with --trim-pool; the baselines at 2,16,8192,128 in the same call.
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
B=$(mktemp -d); tar xJf $C/gpu-bins.tar.xz -C $B
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt
S gpu-tests 240 $B/gpu --test-threads 1 --nocapture
S overhead 180 $B/overhead 2 16 8192 128 30
S overhead-64 120 $B/overhead 4 16 4096 64 30
S candle-lm 300 $B/candle-lm --device cuda --seq 2048 --batch 4 --d-model 512 --heads 8 --layers 6 --steps 300 --lr 2e-3 \
   --compare --compare-steps 10 --generate 400 --target-loss 1.5 --json $R/candle-lm.json
S candle-lm-trim 300 $B/candle-lm --device cuda --seq 2048 --batch 4 --d-model 512 --heads 8 --layers 6 --steps 30 --lr 2e-3 \
   --compare --compare-steps 10 --generate 100 --target-loss 9 --trim-pool --json $R/candle-lm-trim.json
S baselines 240 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; grep -E "test result|panicked|forward|fwd\+bwd|trained|sbgen  |softmax  |naive-sb  |generated|failed|Error|tflops|ms" $f | head -14; done
