#!/bin/bash
# Session 12, call 2: correctness of the decode without the per-step memset (self-resetting exit
# slots and unit counters) and with the first key blocks requested before the q tile is waited for:
# the full decode check (head dims 64/128, both dtypes), compute-sanitizer, the independent
# decode_check.py, the GPU tests, sb-layer (default-schedule decode kernel embedded).
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
P=$(mktemp -d); tar xzf $C/ptx-dec.tar.gz -C $P; export SBGEN_PTX_DIR=$P/ptx
S() { local name=$1 lim=$2 thr=$3; shift 3; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" --threads $thr > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
L=300
S dec-128-bf16 $L 4 $C/sbgen check --pass decode --head-dim 128 --dtype bf16 --failures-only &
S dec-128-f16 $L 4 $C/sbgen check --pass decode --head-dim 128 --dtype f16 --failures-only &
S dec-64 $L 4 $C/sbgen check --pass decode --head-dim 64 --failures-only &
SAN="--pass decode --seq 0,1,17,300,1000 --head-dim 128 --dtype bf16 --regime random,long_reach --kv-groups 4 --mask strict --remainder fuse --early-exit off,24 --layout bhnd,paged --page-size 16"
( for tool in memcheck racecheck synccheck initcheck; do
    S san-$tool 150 1 compute-sanitizer --tool $tool --error-exitcode 9 $C/sbgen check $SAN
  done ) &
( echo "=== gpu tests $(date +%T)" >> $R/steps.txt
  SBGEN_REQUIRE_GPU=1 timeout -k 5 200 $C/gpu --test-threads 2 > $R/gpu-tests.log 2>&1
  echo "gpu tests rc=$? $(date +%T)" >> $R/steps.txt
  SBGEN_REQUIRE_GPU=1 timeout -k 5 120 $C/sb-layer > $R/sb-layer.log 2>&1
  echo "sb-layer rc=$? $(date +%T)" >> $R/steps.txt ) &
( echo "=== decode_check.py $(date +%T)" >> $R/steps.txt
  timeout -k 5 300 python3 $C/decode_check.py $C/sbgen --workdir /tmp/dc > $R/decode_check.log 2>&1
  echo "decode_check.py rc=$? $(date +%T)" >> $R/steps.txt ) &
wait
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; grep -E "SUMMARY|^check:|FAIL|decode_check:|test result|panicked|sb-layer|decode o|decode rem|error" $f | head -12; done
