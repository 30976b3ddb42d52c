#!/usr/bin/env bash
# Session 28 call 2: cache entries not yet tuned against the wgmma candidates, and what call 1's
# limits cut.
# - The 256-wide backward (its entries were tuned before the wgmma backward existed) and the f16
#   THD, BNHD and BNHD-fused forward at 128 (tuned before the producer forward), into a copy of the
#   shipped cache, returned xz-compressed after each tune.
# - The rest of the backward's full matrix at 128 on the TMA default (call 1 reached 864 of 960:
#   the last group, sharp data with 4 query heads per K/V head); the tensor-core scan's full matrix;
#   memcheck on the producer backward (call 1 reached 44 of 72 runs).
set -u
C=$PWD/.carry; R=/tmp/r2; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p2 && tar xJf $C/ptx-s28c2.tar.xz -C /tmp/p2 && export SBGEN_PTX_DIR=/tmp/p2/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r2; }
N=$C/bin/sbgen
CS=/usr/local/cuda/bin/compute-sanitizer
cp sbgen/default-cache.json $R/cache.json
T="$N tune --gpu sm_90 --cache $R/cache.json"
save() { xz -T4 -c $R/cache.json > $OUT/cache.json.xz; }
run tune-bwd256-bf16 95 $T --head-dim 256 --pass bwd --dtype bf16 --budget-s 85; save
run tune-bwd256-f16 95 $T --head-dim 256 --pass bwd --dtype f16 --budget-s 85; save
for l in thd bnhd; do
  run tune-fwd128-f16-$l 72 $T --head-dim 128 --dtype f16 --pass fwd --layout $l --budget-s 65; save
done
run tune-fwd128-f16-bnhd-fuse 72 $T --head-dim 128 --dtype f16 --pass fwd --layout bnhd --remainder fuse --budget-s 65; save
run check-full-bwd128-sharp4 70 $N check --pass bwd --head-dim 128 --dtype bf16 --seq 1,64,4097 --layout bhnd,bnhd,thd --varlen 0,1,64,4097 --kv-groups 4 --regime sharp --failures-only
run check-full-tc 90 $N check --pass fwd --head-dim 64,128 --dtype bf16 --seq 1,64,4097 --layout bhnd,thd --varlen 0,1,4097 --kv-groups 1,4 --remainder return --softplus mufu --mma wgmma --cumsum tensor_core --stages 2 --failures-only
run memcheck-producer 60 $CS --tool memcheck --error-exitcode 1 $N check --pass bwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout thd --varlen 1,300 --deterministic off,on --kv-groups 4 --block-m 128 --warps 8 --softplus linear --mma wgmma --loads producer
tar czf $OUT/r.tgz -C /tmp r2
