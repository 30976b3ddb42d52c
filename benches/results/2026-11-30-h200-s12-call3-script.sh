#!/bin/bash
# Session 12, call 3: the decode grid (B 8/32/64 x N 8192/32768/131072, 32:8, D 128; contiguous and
# paged/16; exit off and T=24) with the read flush and with the write flush, the baselines of the same
# shapes (baselines.py: do_bench, write flush; sdpa_decode.py: both flushes), Nsight Compute's
# kernel-only time at 8 x 8192; then tune --pass decode (bhnd, paged) into the default cache.
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cp $C/cache-in.json $R/default-cache.json; cd $OUT && tar czf results.tgz r' EXIT
P=$(mktemp -d); tar xzf $C/ptx-dec.tar.gz -C $P; export SBGEN_PTX_DIR=$P/ptx
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $R/gpu.txt
for f in read write; do
  timeout 200 $C/sbgen bench --decode --flush $f --json $R/decode-$f.json > $R/bench-decode-$f.log 2>&1; echo "bench $f rc=$?"
  grep -v "^device" $R/bench-decode-$f.log
done
SHAPES="8,32,8,8192,128 8,32,8,32768,128 8,32,8,131072,128 32,32,8,8192,128 32,32,8,32768,128 32,32,8,131072,128 64,32,8,8192,128 64,32,8,32768,128 64,32,8,131072,128"
timeout 150 python3 $C/baselines.py --decode $SHAPES --json $R/baselines-decode.json > $R/baselines-decode.log 2> $R/baselines-decode.err; echo "baselines rc=$?"
cat $R/baselines-decode.log
timeout 120 python3 $C/sdpa_decode.py --json $R/sdpa-decode.json $SHAPES > $R/sdpa-decode.log 2>&1; echo "sdpa rc=$?"; cat $R/sdpa-decode.log
timeout 100 ncu --clock-control none --cache-control all -k regex:sb_dec --launch-count 2 \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
  $C/sbgen bench --decode 8,32,8,8192,128 --kv-cache bhnd --early-exit off --reps 20 > $R/ncu.log 2>&1; echo "ncu rc=$?"
grep -E "sb_dec|gpu__time|dram__" $R/ncu.log | head -12
T=$(mktemp -d); tar xzf $C/ptx-tune-dec.tar.gz -C $T
for L in bhnd paged; do
  timeout -k 5 150 $C/sbgen tune --gpu sm_90 --pass decode --head-dim 64,128 --dtype bf16,f16 --layout $L \
    --seq 8192,32768 --budget-s 0 --ptx-dir $T/ptx --cache $C/cache-in.json > $R/tune-decode-$L.log 2> $R/tune-decode-$L.err
  echo "tune $L rc=$?"; tail -12 $R/tune-decode-$L.log
done
