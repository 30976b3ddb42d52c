#!/bin/bash
# Session 12, call 4: decode with paged key blocks gathered page run by page run (32/64-key blocks
# on 16-token pages): the full decode check (head dims 64/128, both dtypes), the paged check with
# 32- and 64-key blocks (page sizes 16/32/64), compute-sanitizer on a 32-key paged kernel, the
# independent decode_check.py, the GPU tests; then tune --pass decode (bhnd, paged) into the cache.
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cp $C/cache-in.json $R/default-cache.json; cd $OUT && tar czf results.tgz r' EXIT
P=$(mktemp -d); tar xzf $C/ptx-dec.tar.gz -C $P; export SBGEN_PTX_DIR=$P/ptx
S() { local name=$1 lim=$2 thr=$3; shift 3; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" --threads $thr > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
L=240
S dec-128-bf16 $L 3 $C/sbgen check --pass decode --head-dim 128 --dtype bf16 --failures-only &
S dec-128-f16 $L 3 $C/sbgen check --pass decode --head-dim 128 --dtype f16 --failures-only &
S dec-64 $L 3 $C/sbgen check --pass decode --head-dim 64 --failures-only &
S paged-n32 $L 2 $C/sbgen check --pass decode --head-dim 64,128 --layout paged --page-size 16,32,64 --block-m 16 --block-n 32 --warps 4 --stages 2 --failures-only &
S paged-n64 $L 2 $C/sbgen check --pass decode --head-dim 64 --layout paged --page-size 16,32,64 --block-m 16 --block-n 64 --warps 4 --stages 2 --failures-only &
SAN="--pass decode --seq 0,1,17,300,1000 --head-dim 128 --dtype bf16 --regime random,long_reach --kv-groups 4 --mask strict --remainder fuse --early-exit off,24 --layout paged --page-size 16 --block-m 16 --block-n 32 --warps 4 --stages 2"
( for tool in memcheck racecheck synccheck initcheck; do
    S san-$tool 100 1 compute-sanitizer --tool $tool --error-exitcode 9 $C/sbgen check $SAN
  done ) &
( echo "=== gpu tests $(date +%T)" >> $R/steps.txt
  SBGEN_REQUIRE_GPU=1 timeout -k 5 200 $C/gpu --test-threads 2 > $R/gpu-tests.log 2>&1
  echo "gpu tests rc=$? $(date +%T)" >> $R/steps.txt ) &
( echo "=== decode_check.py $(date +%T)" >> $R/steps.txt
  timeout -k 5 240 python3 $C/decode_check.py $C/sbgen --workdir /tmp/dc > $R/decode_check.log 2>&1
  echo "decode_check.py rc=$? $(date +%T)" >> $R/steps.txt ) &
wait
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; grep -E "SUMMARY|^check:|FAIL|decode_check:|test result|panicked|error" $f | head -8; done
T=$(mktemp -d); tar xzf $C/ptx-tune-dec.tar.gz -C $T
for L in bhnd paged; do
  timeout -k 5 120 $C/sbgen tune --gpu sm_90 --pass decode --head-dim 64,128 --dtype bf16,f16 --layout $L \
    --seq 8192,32768 --budget-s 0 --ptx-dir $T/ptx --cache $C/cache-in.json > $R/tune-decode-$L.log 2> $R/tune-decode-$L.err
  echo "tune $L rc=$?"; tail -11 $R/tune-decode-$L.log
done
