# shellcheck shell=bash
# Source this file (`source scripts/env.sh`) to get the pinned CUDA 13.0 compilers that sbgen uses:
# NVRTC, ptxas and the CUDA headers from PyPI wheels, installed once into a cache folder
# (${SBGEN_CACHE_DIR:-~/.cache/sbgen}/cuda-13.0), then put on the environment:
#
#   SBGEN_CUDA_HOME  the folder with include/, bin/ptxas and lib/libnvrtc.so.13 (sbgen reads it)
#   LD_LIBRARY_PATH  + $SBGEN_CUDA_HOME/lib (cudarc loads NVRTC by name)
#   PATH             + $SBGEN_CUDA_HOME/bin (ptxas, nvcc for debugging)
#
# No GPU is needed. CUDA_HOME / CUDA_PATH are left alone on purpose: cudarc's build script watches
# them, and changing them would rebuild it.
#
# Pinned to 13.0: it emits PTX ISA 9.0, which the H200 machine's driver (580, CUDA 13.0) loads.

SBGEN_CUDA_WHEELS="nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85"
SBGEN_CACHE_DIR="${SBGEN_CACHE_DIR:-$HOME/.cache/sbgen}"
SBGEN_CUDA_DIR="$SBGEN_CACHE_DIR/cuda-13.0"

# True when $1 (a pip --target folder) holds every pinned wheel and the files sbgen needs.
_sbgen_cuda_complete() {
    local dir="$1" spec name version
    for spec in $SBGEN_CUDA_WHEELS; do
        name="${spec%%==*}"
        version="${spec##*==}"
        [ -d "$dir/${name//-/_}-$version.dist-info" ] || return 1
    done
    [ -f "$dir/nvidia/cu13/include/cuda_bf16.h" ] && [ -x "$dir/nvidia/cu13/bin/ptxas" ] &&
        [ -f "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]
}

# Installs the wheels unless the marker written after a complete install says they are there.
# The install goes to a temporary folder that is renamed into place, so an interrupted install
# never looks complete.
sbgen_install_cuda() {
    local marker="$SBGEN_CUDA_DIR/.sbgen-complete"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$SBGEN_CUDA_WHEELS" ]; then
        return 0
    fi
    if _sbgen_cuda_complete "$SBGEN_CUDA_DIR"; then
        # Installed earlier without the marker (by hand, or by an older script): adopt it.
        printf '%s\n' "$SBGEN_CUDA_WHEELS" >"$marker"
        return 0
    fi
    echo "sbgen: installing the CUDA 13.0 compilers into $SBGEN_CUDA_DIR (about 500 MB, once)" >&2
    local tmp="$SBGEN_CUDA_DIR.partial.$$"
    mkdir -p "$SBGEN_CACHE_DIR" || return 1
    rm -rf "$tmp"
    # shellcheck disable=SC2086 # the wheel list is meant to split into words
    if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" $SBGEN_CUDA_WHEELS; then
        rm -rf "$tmp"
        echo "sbgen: pip install of the CUDA wheels failed (needs python3 with pip and network access)" >&2
        return 1
    fi
    if ! _sbgen_cuda_complete "$tmp"; then
        rm -rf "$tmp"
        echo "sbgen: the CUDA wheels installed, but headers, ptxas or libnvrtc are missing" >&2
        return 1
    fi
    rm -rf "$SBGEN_CUDA_DIR"
    mv "$tmp" "$SBGEN_CUDA_DIR" || return 1
    printf '%s\n' "$SBGEN_CUDA_WHEELS" >"$SBGEN_CUDA_DIR/.sbgen-complete"
}

if sbgen_install_cuda; then
    export SBGEN_CUDA_HOME="$SBGEN_CUDA_DIR/nvidia/cu13"
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$SBGEN_CUDA_HOME/lib:"*) ;;
        *) export LD_LIBRARY_PATH="$SBGEN_CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
    case ":$PATH:" in
        *":$SBGEN_CUDA_HOME/bin:"*) ;;
        *) export PATH="$SBGEN_CUDA_HOME/bin:$PATH" ;;
    esac
else
    echo "sbgen: the CUDA toolchain is not set up; see scripts/env.sh" >&2
    false
fi
