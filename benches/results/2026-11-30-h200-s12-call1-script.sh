#!/bin/bash
# Session 12, call 1: where the 8 x 8192 decode's fixed ~19 us goes. Read vs write L2 flush for
# sbgen's decode and torch SDPA (cuDNN, flash) on the same shapes; a tiny context for the step's
# fixed cost; Nsight Compute's kernel-only time and DRAM bytes at 8 x 8192.
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $R/gpu.txt
S="8,32,8,8192,128 8,32,8,32768,128 8,32,8,131072,128 64,32,8,8192,128 8,32,8,64,128"
for f in read write; do
  timeout 150 $C/sbgen bench --decode $S --flush $f --json $R/decode-$f.json > $R/bench-$f.log 2>&1; echo "bench $f rc=$?"
  grep -v "^device" $R/bench-$f.log
done
timeout 120 python3 $C/sdpa_decode.py --json $R/sdpa.json $S > $R/sdpa.log 2>&1; echo "sdpa rc=$?"; cat $R/sdpa.log
timeout 150 ncu --clock-control none --cache-control all -k regex:sb_decode --launch-count 3 \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_active.avg \
  $C/sbgen bench --decode 8,32,8,8192,128 --kv-cache bhnd --early-exit off --reps 20 > $R/ncu.log 2>&1; echo "ncu rc=$?"
grep -E "sb_decode|gpu__time|dram__|sm__cycles" $R/ncu.log | head -30
