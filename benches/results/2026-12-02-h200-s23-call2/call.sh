#!/usr/bin/env bash
# Session 23 call 2: key_grads in 2 x 2 piece groups (half the ldmatrix of the dK/dV products) against
# the call-1 binary in the same call; its backward checked against float64; Nsight Compute on both.
set -u
C=$PWD/.carry; R=/tmp/r2; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p2 && tar xJf $C/ptx-check.tar.xz -C /tmp/p2 && export SBGEN_PTX_DIR=/tmp/p2/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r2; }
N=$C/bin/sbgen; O=$C/bin/sbgen-s22
B="bench --shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 --early-exit off --reps 20"
run bench-old1 60 $O $B
run bench-new1 40 $N $B --json $R/bench.json
run bench-old2 30 $O $B
run bench-new2 30 $N $B
NCU="/usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:^sb_bwd_d128.*[0-9a-f]$ --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy --metrics lts__t_sectors_op_red.sum,lts__t_requests_op_red.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_op_ldsm.sum,smsp__inst_executed.sum"
run ncu-bwd-new 90 $NCU $N bench --shapes 2,16,8192,128 --early-exit off --reps 20
run ncu-bwd-old 90 $NCU $O bench --shapes 2,16,8192,128 --early-exit off --reps 20
run check-bwd 150 $N check --quick --pass bwd --head-dim 64,128 --dtype bf16,f16 --layout bhnd,bnhd,thd --varlen 0,17,1000 --failures-only
run check-det 60 $N check --quick --pass bwd --head-dim 128,64 --dtype bf16 --deterministic on --mask strict --failures-only
run check-wide 60 $N check --quick --pass bwd --head-dim 256,96,32 --dtype bf16 --layout bhnd --failures-only
run memcheck 60 /usr/local/cuda/bin/compute-sanitizer --tool memcheck $N check --head-dim 128,64 --dtype bf16 --seq 300 --regime random --mask strict --remainder return --layout bhnd,thd --varlen 1,300 --deterministic off,on
