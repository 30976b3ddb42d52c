#!/bin/bash
# Session 12, call 6: the decode grid (B 8/32/64 x N 8192/32768/131072, 32:8, D 128; contiguous and
# paged/16; exit off and T=24; default schedules; read flush), 8 x 8192 with the write flush and with
# the tuned schedules, the same shapes' baselines (baselines.py: do_bench's write flush;
# sdpa_decode.py: both flushes), and sb-layer built with the re-tuned default cache.
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
P=$(mktemp -d); tar xzf $C/ptx-dec.tar.gz -C $P; export SBGEN_PTX_DIR=$P/ptx
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $R/gpu.txt
timeout 200 $C/sbgen bench --decode --json $R/decode.json > $R/bench-decode.log 2>&1; echo "bench rc=$?"
grep -v "^device" $R/bench-decode.log
timeout 60 $C/sbgen bench --decode 8,32,8,8192,128 --flush write --json $R/decode-write.json > $R/bench-decode-write.log 2>&1; echo "write rc=$?"; tail -4 $R/bench-decode-write.log
timeout 60 $C/sbgen bench --decode 8,32,8,8192,128 --kv-cache bhnd --block-m 16 --block-n 32 --warps 4 --stages 3 --json $R/decode-tuned-bhnd.json > $R/bench-decode-tuned-bhnd.log 2>&1; echo "tuned bhnd rc=$?"; tail -2 $R/bench-decode-tuned-bhnd.log
timeout 60 $C/sbgen bench --decode 8,32,8,8192,128 --kv-cache paged --block-m 16 --block-n 16 --warps 8 --stages 3 --json $R/decode-tuned-paged.json > $R/bench-decode-tuned-paged.log 2>&1; echo "tuned paged rc=$?"; tail -2 $R/bench-decode-tuned-paged.log
SHAPES="8,32,8,8192,128 8,32,8,32768,128 8,32,8,131072,128 32,32,8,8192,128 32,32,8,32768,128 32,32,8,131072,128 64,32,8,8192,128 64,32,8,32768,128 64,32,8,131072,128"
timeout 150 python3 $C/baselines.py --decode $SHAPES --json $R/baselines-decode.json > $R/baselines-decode.log 2> $R/baselines-decode.err; echo "baselines rc=$?"; cat $R/baselines-decode.log
timeout 120 python3 $C/sdpa_decode.py --json $R/sdpa-decode.json $SHAPES > $R/sdpa-decode.log 2>&1; echo "sdpa rc=$?"; cat $R/sdpa-decode.log
SBGEN_REQUIRE_GPU=1 timeout -k 5 60 $C/sb-layer > $R/sb-layer.log 2>&1; echo "sb-layer rc=$?"; tail -4 $R/sb-layer.log
