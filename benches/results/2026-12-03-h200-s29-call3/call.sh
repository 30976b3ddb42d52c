#!/usr/bin/env bash
# Session 29 call 3, on the machine call 2 had left warm (its /tmp/r2 and /tmp/p2 still there): the
# two tunes call 2's deadline skipped (the 64-wide f16 BNHD and BNHD-fused forward), into call 2's
# returned cache (copied into .carry as cache-s29.json.xz), then the bf16 forward's full check
# matrix at 128 (N = 1, 64, 4097; BHND, BNHD, THD packed 0, 1, 64, 4097; GQA 1 and 4) on the final
# kernels. This is the one command line the call ran, spread over lines.
mkdir -p /tmp/r3
(END=190 SPECS="fwd64-f16-bnhd fwd64-f16-bnhd-fuse" bash benches/results/2026-12-03-h200-s29-call2/call.sh)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 SBGEN_CUDA_HOME=/usr/local/cuda SBGEN_PTX_DIR=/tmp/p2/ptx
timeout 150 .carry/bin/sbgen check --head-dim 128 --dtype bf16 --pass fwd --seq 1,64,4097 --layout bhnd,bnhd,thd --varlen 0,1,64,4097 --kv-groups 1,4 --failures-only > /tmp/r2/c128bf16-fwd.log 2>&1
echo "c128bf16-fwd rc=$?" >> /tmp/r2/steps.txt
tar czf $OUT/r.tgz -C /tmp --exclude=cache.json r2
