#!/usr/bin/env bash
# Link-time stand-ins for the CUDA libraries that candle's `cuda` feature links against (cudarc's
# `dynamic-linking`: libcuda, libnvrtc, libcublas, libcublasLt, libcurand), so that a binary using
# candle on CUDA (sbgen-candle's GPU tests, examples/candle-lm) links on a machine without a GPU or
# a CUDA toolkit. Each stub defines every function cudarc declares for that library and carries the
# real library's SONAME, so the binary loads the real libraries on the GPU machine.
#
#   scripts/dev/cuda-link-stubs.sh DIR      # writes DIR/lib*.so
#   LIBRARY_PATH=DIR cargo build ...       # the C linker searches DIR (no crate is rebuilt)
#
# For development only: nothing a user builds needs it on a machine with CUDA installed.
set -euo pipefail
out="${1:?usage: $0 DIR}"
mkdir -p "$out"
cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)"
stub() { # stub NAME SONAME SYS_MODULE
    local name="$1" soname="$2" sys="$cudarc/src/$3/sys/mod.rs" c="$out/$1.c"
    grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$sys" | awk '{print "void " $4 "(void) {}"}' | sort -u >"$c"
    cc -shared -fPIC -o "$out/lib$name.so" -Wl,-soname,"$soname" "$c"
    echo "$out/lib$name.so ($soname): $(wc -l <"$c") functions"
}
stub cuda libcuda.so.1 driver
stub nvrtc libnvrtc.so.13 nvrtc
stub cublas libcublas.so.13 cublas
stub cublasLt libcublasLt.so.13 cublaslt
stub curand libcurand.so.10 curand
# candle-kernels links its static quantized-matmul library against the CUDA runtime: the real one
# from the pinned wheels (scripts/env.sh) serves, as its SONAME is the toolkit's.
if [ -n "${SBGEN_CUDA_HOME:-}" ] && [ -f "$SBGEN_CUDA_HOME/lib/libcudart.so.13" ]; then
    ln -sf "$SBGEN_CUDA_HOME/lib/libcudart.so.13" "$out/libcudart.so"
    echo "$out/libcudart.so -> $SBGEN_CUDA_HOME/lib/libcudart.so.13"
else
    echo "note: no libcudart.so.13 (source scripts/env.sh first); candle's CUDA build links against it" >&2
fi
