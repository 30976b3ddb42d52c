#!/usr/bin/env bash
# Session 16 call E (one H200): the wgmma forward with Q from shared memory and the next block's
# Q K^T overlapped with this block's stick math (3+ stages), checked and timed; and the review
# fixes of the ring and the segment backward, rerun on one GPU.
set -u
R=$OUT/r; mkdir -p $R
B=.carry/bin
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/nccl && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
run() { local name=$1; shift; local t0=$SECONDS; timeout 200 "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; }
S=$B/sbgen
run k1 $S check --pass fwd --head-dim 64,128 --dtype bf16,f16 --seq 17,1000 --layout bhnd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --mma wgmma --block-m 64 --block-n 32 --stages 3 --failures-only
run k2 $S check --pass fwd --head-dim 64 --dtype bf16 --seq 17,4097 --early-exit off,24 --mma wgmma --block-m 64 --block-n 64 --stages 3 --failures-only
run k3 $S check --pass fwd --head-dim 128 --dtype bf16 --seq 4097 --layout bnhd --early-exit off,24 --mma wgmma --block-m 128 --block-n 32 --stages 4 --failures-only
run k4 $S check --pass fwd --head-dim 128 --dtype bf16 --seq 17,1000 --mma wgmma --block-m 64 --block-n 64 --stages 2 --failures-only
run t0 $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 20
for sch in "64 32 3" "64 32 4" "128 32 3" "64 64 2"; do set -- $sch
  run "tw-$1-$2-$3" $S bench --shapes 2,16,8192,128 4,16,4096,64 --fwd-only --early-exit off --reps 20 --mma wgmma --block-m $1 --block-n $2 --stages $3
done
run tw64 $S bench --shapes 4,16,4096,64 --fwd-only --early-exit off --reps 20 --mma wgmma --block-m 64 --block-n 64 --stages 3
run sanit /usr/local/cuda/bin/compute-sanitizer --tool memcheck $S check --pass fwd --head-dim 128 --dtype bf16 --seq 300 --regime random --mma wgmma --block-m 64 --block-n 32 --stages 3
run c1 $B/segment_check --backward --seq 4097 --ranks 3 --scheme zigzag --heads 4 --kv-heads 1 --head-dim 64 --dtype f16 --layout bnhd --mask attend_current --remainder fuse --data long --seed 12
run c3 $B/segment_check --backward --seq 4097 --ranks 8 --scheme contiguous --heads 2 --kv-heads 2 --head-dim 128 --layout bnhd --remainder fuse --early-exit 24 --data normal --seed 13
run r1 $B/ring_check --ranks 1 --backward --seq 4097 --heads 4 --kv-heads 2 --head-dim 128 --data long --rows 32 --time --reps 3
run b1 $S bench --gpus 1 --shapes 1,16,32768,128 --reps 20
run b2 $S bench --gpus 2 --shapes 1,4,8192,128
cd $OUT && tar czf results.tgz r && rm -rf r
