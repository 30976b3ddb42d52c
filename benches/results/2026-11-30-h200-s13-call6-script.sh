#!/bin/bash
# Session 13, call 6: the progress reporting of `check` and `tune` on the GPU (merged from the
# plot-progress branch): plain lines when stderr is not a terminal, the bar under `script` (a pty).
export PATH=/usr/local/cuda/bin:$PATH SBGEN_CUDA_HOME=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64
C=$PWD/.carry; R=$OUT/r; mkdir -p $R
trap 'cd $OUT && tar czf results.tgz r' EXIT
S() { local name=$1 lim=$2; shift 2; echo "=== $name $(date +%T): $*" >> $R/steps.txt; timeout -k 5 $lim "$@" > $R/$name.log 2> $R/$name.err; echo "$name rc=$? $(date +%T)" >> $R/steps.txt; }
S check-quick 240 $C/sbgen check --quick --head-dim 64 --dtype bf16 --threads 4
S check-decode 120 $C/sbgen check --pass decode --quick --head-dim 64 --dtype bf16 --threads 4
S tune 120 $C/sbgen tune --gpu sm_90 --head-dim 64 --dtype bf16 --seq 2048 --budget-s 40 --cache /tmp/t.json
echo "=== pty $(date +%T)" >> $R/steps.txt
timeout -k 5 120 script -qec "$C/sbgen check --quick --head-dim 64 --dtype f16 --threads 4" /dev/null > $R/check-pty.log 2>&1; echo "pty rc=$?" >> $R/steps.txt
cat $R/steps.txt; for f in $R/*.err; do echo "--- $f"; head -3 $f; echo ...; tail -3 $f; done
for f in $R/*.log; do echo "--- $f"; tail -4 $f | cut -c1-200; done
