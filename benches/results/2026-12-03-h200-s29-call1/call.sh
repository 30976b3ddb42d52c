#!/usr/bin/env bash
# Session 29 call 1: the rest of issue #11's "whole `sbgen check` matrix clean on the new path" on the
# final kernels (7c8f1c5, PTX as sessions 28's f138055): the full lengths N = 1, 64, 4097 at
# head_dim 64 (bf16 and f16, forward and backward) and in f16 at 128. The default layouts (BHND,
# BNHD) first, then the THD packed batches and 4:1 K/V groups. One deadline for the whole call.
set -u
C=$PWD/.carry; R=/tmp/r1; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p1 && tar xJf $C/ptx-s29.tar.xz -C /tmp/p1 && export SBGEN_PTX_DIR=/tmp/p1/ptx
END=575
run() { local name=$1 lim=$2; shift 2; local left=$((END - SECONDS)); [ $left -lt $lim ] && lim=$left
  [ $lim -le 5 ] && { echo "$name skipped: no time left" >> $R/steps.txt; return; }
  local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r1; }
N=$C/bin/sbgen
FULL="--seq 1,64,4097 --failures-only"
EXT="--layout thd --varlen 0,1,64,4097 --kv-groups 1,4"
run c64-dense 240 $N check --head-dim 64 $FULL
run c128f16-dense 200 $N check --head-dim 128 --dtype f16 $FULL
run c64-gqa 200 $N check --head-dim 64 $FULL --kv-groups 4
run c128f16-gqa 200 $N check --head-dim 128 --dtype f16 $FULL --kv-groups 4
run c64-thd 200 $N check --head-dim 64 $FULL $EXT
run c128f16-thd 200 $N check --head-dim 128 --dtype f16 $FULL $EXT
tar czf $OUT/r.tgz -C /tmp r1
