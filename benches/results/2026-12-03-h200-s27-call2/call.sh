#!/usr/bin/env bash
# Session 27 call 2: the backward with a producer warpgroup (loads = producer) checked (quick
# matrices at 128 and 64, deterministic, sanitizers) and timed against its TMA and cp.async twins;
# then the 128-wide bf16 BHND backward cache entries re-tuned over every loads choice (without a
# budget, so that no candidate is left out), and the deterministic one. Tuned into a copy of the
# shipped cache, returned xz-compressed.
set -u
C=$PWD/.carry; R=/tmp/r2; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p2 && tar xJf $C/ptx-s27c2.tar.xz -C /tmp/p2 && export SBGEN_PTX_DIR=/tmp/p2/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; local rc=$?; echo "$name rc=$rc $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r2; return $rc; }
N=$C/bin/sbgen
CS=/usr/local/cuda/bin/compute-sanitizer
W128="--block-m 128 --warps 8 --softplus linear --mma wgmma --loads producer"
W64="--softplus linear --mma wgmma --loads producer"
SAN="check --pass bwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --deterministic off,on"
ok=1
run check-ws128 110 $N check --quick --pass bwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --deterministic off,on $W128 --failures-only || ok=0
run check-ws64 30 $N check --quick --pass bwd --head-dim 64 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 --regime random,sharp --remainder return --mask strict $W64 --failures-only || ok=0
run racecheck-ws 40 $CS --tool racecheck --error-exitcode 1 $N $SAN --kv-groups 1 $W128 || ok=0
run synccheck-ws 20 $CS --tool synccheck --error-exitcode 1 $N $SAN --kv-groups 4 $W128 || ok=0
for l in producer tma cp_async; do
  run bench128-$l 15 $N bench --shapes 2,16,8192,128 --early-exit off --reps 30 ${W128/producer/$l}
  run bench64-$l 15 $N bench --shapes 4,16,4096,64 --early-exit off --reps 30 ${W64/producer/$l}
done
echo "producer checks ok=$ok" >> $R/steps.txt
# A producer kernel that failed its checks is never chosen (tune checks each candidate), but one
# that hangs would stall the tuner: without ok=1 the tunes run on a binary whose search space has
# no producer backward.
B=$N; [ $ok = 1 ] || B=$C/bin/sbgen-noprod
cp sbgen/default-cache.json $R/cache.json
T="$B tune --gpu sm_90 --cache $R/cache.json --pass bwd --head-dim 128"
run tune-bf16 230 $T --dtype bf16 --budget-s 0
run tune-bf16-det 150 $T --dtype bf16 --deterministic --budget-s 0 --reps 10
xz -T4 -c $R/cache.json > $OUT/cache.json.xz; rm -f $R/cache.json
tar czf $OUT/r.tgz -C /tmp r2
