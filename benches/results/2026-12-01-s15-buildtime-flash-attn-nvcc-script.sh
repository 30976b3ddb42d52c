#!/usr/bin/env bash
# Times nvcc on each of candle-flash-attn 0.11.1's 53 kernel files, in build.rs's order, with the
# arguments cudaforge 0.1.6 passes (CUDA_COMPUTE_CAP=90), one at a time as its build does on 2 cores.
# Differences from the build: the header-hash define is 0x0 (build.rs hashes the headers; the value
# only names the build) and nvcc's --verbose is left out (it only prints). Run at nice 19.
source /work/main/scripts/env.sh
FA=~/.cargo/registry/src/index.crates.io-*/candle-flash-attn-0.11.1
cd $FA
HASH=$(grep -o 'CANDLE_FLASH_ATTN_HEADER_HASH' build.rs >/dev/null; echo 0x0)
mkdir -p /work/scratch/buildtime/obj
nvcc --version | tail -2 > /work/scratch/buildtime/nvcc-version.txt
for f in $(sed -n '/KERNEL_FILES/,/^];/p' build.rs | grep -o 'kernels/[a-z0-9_]*\.cu'); do
  o=/work/scratch/buildtime/obj/$(basename $f .cu).o
  /usr/bin/time -f "$f user %U sys %S wall %e rc %x" -a -o /work/scratch/buildtime/nvcc-times.log \
    nvcc -gencode=arch=compute_90,code=sm_90 -c -o $o --default-stream per-thread \
      -std=c++17 -O3 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__ \
      -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math \
      -DCANDLE_FLASH_ATTN_HEADER_HASH=0x0 -Xcompiler -fPIC \
      -I/work/scratch/buildtime/cutlass/include -I/work/scratch/buildtime/cutlass/tools/util/include -DUSE_CUTLASS \
      -Xcompiler -fPIC $f > /work/scratch/buildtime/nvcc-$(basename $f .cu).log 2>&1
done
echo finished >> /work/scratch/buildtime/nvcc-times.log
