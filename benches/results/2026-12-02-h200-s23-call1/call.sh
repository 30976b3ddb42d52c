#!/usr/bin/env bash
# Session 23 call 1: Nsight Compute on the default 128-wide backward (what bounds it now), then the
# default cache's 28 untimed forward entries re-tuned (256; BNHD, THD and BNHD-fused at 64/128).
set -u
C=$PWD/.carry; R=/tmp/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
mkdir -p /tmp/p && tar xJf $C/ptx-tune.tar.xz -C /tmp/p && export SBGEN_PTX_DIR=/tmp/p/ptx
ls /tmp/p/ptx | wc -l > $R/ptx-count.txt
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r; }
N=$C/bin/sbgen
run bench 40 $N bench --shapes 2,16,8192,128 --early-exit off --reps 20
run ncu-bwd 120 /usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:'^sb_bwd_d128.*[0-9a-f]$' --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy --metrics lts__t_sectors_op_red.sum,lts__t_requests_op_red.sum,lts__t_sectors_op_write.sum,lts__t_sectors_op_read.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_op_ldsm.sum $N bench --shapes 2,16,8192,128 --early-exit off --reps 2
cp sbgen/default-cache.json $R/default-cache.json
T="--gpu sm_90 --cache $R/default-cache.json"
run tune-256 110 $N tune $T --head-dim 256 --pass fwd --budget-s 70
run tune-bnhd 170 $N tune $T --head-dim 64,128 --layout bnhd --remainder return --pass fwd --budget-s 110
run tune-thd 170 $N tune $T --head-dim 64,128 --layout thd --remainder return --pass fwd --budget-s 110
run tune-fuse 170 $N tune $T --head-dim 64,128 --layout bnhd --remainder fuse --pass fwd --budget-s 110
