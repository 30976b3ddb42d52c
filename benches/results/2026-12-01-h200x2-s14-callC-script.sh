#!/bin/bash
# Session 14, call C (nvidia-h200-x2): NCCL ring shifts between the two GPUs through cudarc
# (sbgen-dist's `nccl` module, example ring_shift), and the candle CPU path's throughput on this
# host's 16 cores (before: commit 495098e's per-row path; after: the blocked path of 9942089).
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/env.txt; nvidia-smi topo -m >> $R/env.txt 2>&1; nproc >> $R/env.txt
# cudarc looks for libnccl.so, the host has libnccl.so.2 only.
L=$(mktemp -d); ln -s /usr/lib/x86_64-linux-gnu/libnccl.so.2 $L/libnccl.so; export LD_LIBRARY_PATH=$L:$LD_LIBRARY_PATH
S shift-512 120 $C/ring_shift 2 512 20
S shift-64 120 $C/ring_shift 2 64 50
S shift-1rank 60 $C/ring_shift 1 64 10
S cpu-after-16t 120 $C/cpu_throughput 1 16 2048 64 3
S cpu-before-16t 200 $C/cpu_throughput_before 1 16 2048 64 2
S cpu-after-1head 60 $C/cpu_throughput 1 1 4096 64 3
S cpu-before-1head 200 $C/cpu_throughput_before 1 1 4096 64 2
cat $R/steps.txt; for f in $R/*.log; do echo "--- $f"; cat $f | head -12; done
