#!/usr/bin/env bash
# Session 23 call 3: the grouped key_grads binary next to the baselines and the call-1 binary in one
# call; Nsight Compute on both backwards (a timed launch); the default cache's BHND 64/128 backward
# and deterministic entries re-tuned (their PTX changed).
set -u
C=$PWD/.carry; R=/tmp/r3; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export SBGEN_CUDA_HOME=/usr/local/cuda
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt 2>&1
pip install --no-index --no-deps --target /tmp/site $C/whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/p3 && tar xJf $C/ptx-c3.tar.xz -C /tmp/p3 && export SBGEN_PTX_DIR=/tmp/p3/ptx
run() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $((SECONDS - t0)) s: $*" >> $R/steps.txt; tar czf $OUT/r.tgz -C /tmp r3; }
N=$C/bin/sbgen; O=$C/bin/sbgen-s22
B="bench --shapes 2,16,8192,128 4,16,4096,64 1,16,8192,256 --early-exit off --reps 20"
run bench-old1 60 $O $B
run bench-new1 40 $N $B --json $R/bench.json
run baselines 160 env PYTHONPATH=/tmp/site python3 $C/baselines.py --json $R/baselines.json 2,16,8192,128 4,16,4096,64
run bench-new2 30 $N $B
run bench-old2 30 $O $B
NCU="/usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:^sb_bwd_d128.*[0-9a-f]$ --launch-skip 15 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy --metrics lts__t_sectors_op_red.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_op_ldsm.sum,smsp__inst_executed.sum"
run ncu-bwd-new 60 $NCU $N bench --shapes 2,16,8192,128 --early-exit off --reps 20
run ncu-bwd-old 60 $NCU $O bench --shapes 2,16,8192,128 --early-exit off --reps 20
cp sbgen/default-cache.json $R/default-cache.json
T="--gpu sm_90 --cache $R/default-cache.json"
run tune-bhnd 170 $N tune $T --head-dim 64,128 --pass bwd --budget-s 150
run tune-det 50 $N tune $T --head-dim 128 --dtype bf16 --pass bwd --deterministic --budget-s 35
