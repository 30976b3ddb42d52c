#!/usr/bin/env bash
# Session 26 call 2: the backward's dK and dV on wgmma (key_grads_wgmma; 128-wide kernels and the
# 8-warp 64-wide ones). Correctness first (quick matrix with the deterministic variant, sanitizers),
# then the new binary against the session-25 binary (.carry/bin/sbgen-s25) in the same call, the
# GPU tests, and Nsight Compute on both backward kernels.
# Also the new early-exit default at 128 (one computing warpgroup and a producer, 64 x 64 x 2): its
# full forward matrix and its time against the session-25 default.
set -u
C=$PWD/.carry; R=/tmp/r2; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p2 && tar xJf $C/ptx-s26c2.tar.xz -C /tmp/p2 && export SBGEN_PTX_DIR=/tmp/p2/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r2; }
N=$C/bin/sbgen; O=$C/bin/sbgen-s25
CS=/usr/local/cuda/bin/compute-sanitizer
S="check --pass bwd --head-dim 128 --dtype bf16 --seq 300 --regime random --layout bhnd,thd --varlen 1,300 --deterministic off,on"
B="bench --shapes 2,16,8192,128 4,16,4096,64 --early-exit off --reps 30"
run check-quick-bwd128 150 $N check --quick --pass bwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000 --kv-groups 1,4 --deterministic off,on --failures-only
run check-full-fwd128-ee 120 $N check --pass fwd --head-dim 128 --dtype bf16 --layout bhnd,bnhd,thd --varlen 0,1,17,1000,4097 --kv-groups 1,4 --early-exit 24 --failures-only
run bench-new 40 $N $B --json $R/bench-new.json
run bench-old 40 $O $B
run bench-new2 40 $N $B
run bench-ee-new 30 $N bench --shapes 2,16,8192,128 --fwd-only --early-exit 24 --reps 30
run bench-ee-old 30 $O bench --shapes 2,16,8192,128 --fwd-only --early-exit 24 --reps 30
run racecheck-bwd 60 $CS --tool racecheck $N $S --kv-groups 1
run synccheck-bwd 60 $CS --tool synccheck $N $S --kv-groups 4
run memcheck-bwd 60 $CS --tool memcheck $N $S --kv-groups 4
run check-bwd64-w8 40 $N check --quick --pass bwd --head-dim 64 --dtype bf16 --layout bhnd,thd --varlen 0,17,1000 --kv-groups 1,4 --block-m 128 --warps 8 --stages 3 --mma wgmma --softplus linear --failures-only
NCU="/usr/local/cuda/bin/ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats -k regex:sb_bwd_d128.*[0-9a-f]$ --launch-skip 4 --launch-count 1"
run ncu-new 60 $NCU $N bench --shapes 2,16,8192,128 --early-exit off --reps 20 --sets 1
run ncu-old 60 $NCU $O bench --shapes 2,16,8192,128 --early-exit off --reps 20 --sets 1
run tests 200 env SBGEN_REQUIRE_GPU=1 $C/gpu --test-threads=1
