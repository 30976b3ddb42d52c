#!/usr/bin/env bash
# Session 29 call 2: cache entries tuned before today's candidates existed, tuned again without a
# budget (every candidate checked, then timed) into the shipped cache: the f16 THD, BNHD and
# BNHD-fused backward at 128 (cp.async winners of session 23/24, before the TMA backward), then the
# 64-wide THD, BNHD and BNHD-fused forward (no TMA candidates then). A tune starts only when the
# call's deadline leaves it the time it needs; the cache returns xz-compressed after each.
set -u
C=$PWD/.carry; R=/tmp/r2; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p2 && tar xJf $C/ptx-s29t.tar.xz -C /tmp/p2 && export SBGEN_PTX_DIR=/tmp/p2/ptx
xz -dc $C/cache-s29.json.xz > $R/cache.json
END=${END:-580}
save() { xz -T4 -c $R/cache.json > $OUT/cache.json.xz; }
# run NAME NEED LIMIT CMD...: skipped unless NEED seconds are left before END.
run() { local name=$1 need=$2 lim=$3; shift 3; local left=$((END - SECONDS))
  [ $left -lt $need ] && { echo "$name skipped: $left s left, needs $need" >> $R/steps.txt; return; }
  [ $left -lt $lim ] && lim=$left
  local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt
  save; tar czf $OUT/r.tgz -C /tmp --exclude=cache.json r2; }
N=$C/bin/sbgen
T="$N tune --gpu sm_90 --cache $R/cache.json --budget-s 0"
for spec in ${SPECS:-bwd128-f16-thd bwd128-f16-bnhd bwd128-f16-bnhd-fuse fwd64-bf16-thd fwd64-bf16-bnhd fwd64-bf16-bnhd-fuse fwd64-f16-thd fwd64-f16-bnhd fwd64-f16-bnhd-fuse}; do
  IFS=- read -r pass dtype layout fuse <<< "$spec"
  hd=${pass#???}; pass=${pass%$hd}
  extra=""; [ -n "$fuse" ] && extra="--remainder fuse"
  if [ $pass = bwd ]; then need=115; else need=85; fi
  run tune-$spec $need 150 $T --pass $pass --head-dim $hd --dtype $dtype --layout $layout $extra
done
tar czf $OUT/r.tgz -C /tmp --exclude=cache.json r2
