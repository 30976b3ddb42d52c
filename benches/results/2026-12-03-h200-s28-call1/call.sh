#!/usr/bin/env bash
# Session 28 call 1: what issue #11 still lacks on the final kernels (f138055). The defaults (the
# 128-wide backward by TMA) timed next to the baselines in one run; the GPU tests on that default;
# memcheck on the producer backward; the backward's full check matrix at 128 (N = 1, 64, 4097, which
# the quick one leaves out) on the TMA default; the tensor-core scan's full matrix; Nsight Compute
# on the TMA backward and its cp.async twin.
set -u
C=$PWD/.carry; R=/tmp/r1; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p1 && tar xJf $C/ptx-s28c1.tar.xz -C /tmp/p1 && export SBGEN_PTX_DIR=/tmp/p1/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r1; }
N=$C/bin/sbgen
CS=/usr/local/cuda/bin/compute-sanitizer
P128="--block-m 128 --warps 8 --softplus linear --mma wgmma --loads producer"
SAN="check --pass bwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --deterministic off,on"
run bench-default 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30 --json $R/bench.json
mkdir -p /tmp/site && pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl > $R/pip.log 2>&1
run baselines 150 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run bench-default2 30 $N bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30
run tests 80 env SBGEN_REQUIRE_GPU=1 $C/gpu --test-threads=1
run memcheck-producer 40 $CS --tool memcheck --error-exitcode 1 $N $SAN --kv-groups 4 $P128
NCU="/usr/local/cuda/bin/ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats -k regex:sb_bwd_d128.*[0-9a-f]$ --launch-skip 4 --launch-count 1"
run ncu-tma 40 $NCU $N bench --shapes 2,16,8192,128 --early-exit off --reps 20 --sets 1
run ncu-cp 40 $NCU $N bench --shapes 2,16,8192,128 --early-exit off --reps 20 --sets 1 --block-m 128 --warps 8 --softplus linear --mma wgmma --loads cp_async
run check-full-bwd128 250 $N check --pass bwd --head-dim 128 --dtype bf16 --seq 1,64,4097 --layout bhnd,bnhd,thd --varlen 0,1,64,4097 --kv-groups 1,4 --failures-only
run check-full-tc 100 $N check --pass fwd --head-dim 64,128 --dtype bf16 --seq 1,64,4097 --layout bhnd,thd --varlen 0,1,4097 --kv-groups 1,4 --remainder return --softplus mufu --mma wgmma --cumsum tensor_core --stages 2 --failures-only
tar czf $OUT/r.tgz -C /tmp r1
