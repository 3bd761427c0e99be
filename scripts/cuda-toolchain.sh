#!/usr/bin/env bash
# Installs a CUDA 13.4 compiler from NVIDIA's PyPI wheels into DIR, for machines without a
# system CUDA toolkit, and writes DIR/env.sh, which points cargo at it:
#
#   scripts/cuda-toolchain.sh [--link] [DIR]     # default DIR: .cuda (ignored by git)
#   . DIR/env.sh
#   cargo build --release --features cuda
#
# Without --link it installs what compiling needs (nvcc, cicc, the CUDA headers), which is
# enough for `cargo check --features cuda`. With --link it also installs the libraries the
# binaries link against (cuBLAS, cuRAND, NVRTC: about 800 MB) and, where no NVIDIA driver is
# installed, a link-time stand-in for the driver's libcuda.so (like the toolkit's
# lib64/stubs/libcuda.so: every function returns an error; at run time the real driver's
# library is used). 13.4 is the newest CUDA that candle's cudarc 0.19 accepts.
set -euo pipefail
link=0
if [ "${1:-}" = "--link" ]; then
  link=1
  shift
fi
dir=${1:-.cuda}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pip=(python3 -m pip install -q --no-deps --disable-pip-version-check --target "$dir/wheels")

if [ ! -x "$dir/wheels/nvidia/cu13/bin/nvcc" ]; then
  echo "installing the CUDA 13.4 compiler wheels (about 150 MB) into $dir ..." >&2
  "${pip[@]}" nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-crt==13.4.92 \
    nvidia-cuda-runtime==13.4.92 nvidia-cuda-cccl==13.3.5.0.6
fi
cuda="$dir/wheels/nvidia/cu13"

if [ "$link" = 1 ]; then
  libs="$dir/libs/nvidia/cu13/lib"
  if [ ! -e "$libs/libcublas.so.13" ]; then
    echo "installing cuBLAS, cuRAND and NVRTC (about 800 MB) ..." >&2
    # A folder of its own: pip --target would skip (or, upgrading, replace) the shared nvidia/.
    python3 -m pip install -q --no-deps --disable-pip-version-check --target "$dir/libs" \
      nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25 nvidia-cuda-nvrtc==13.4.92
  fi
  # The wheels ship versioned names only (libcublas.so.13); the linker looks for libcublas.so.
  mkdir -p "$dir/link"
  for lib in "$cuda"/lib/lib*.so.* "$libs"/lib*.so.*; do
    name=$(basename "$lib")
    ln -sf "$lib" "$dir/link/${name%%.so*}.so"
  done
  driver=$(ldconfig -p 2>/dev/null | grep -oE '/[^ ]*/libcuda\.so\.1$' | head -n 1 || true)
  if [ -n "$driver" ]; then
    ln -sf "$driver" "$dir/link/libcuda.so"
  else
    # Every driver function cudarc declares, as a stub returning CUDA_ERROR_UNKNOWN (999).
    decls=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19*/src/driver/sys/mod.rs' |
      head -n 1)
    if [ -z "$decls" ]; then
      echo "cudarc's sources are not in the cargo registry yet: run \`cargo fetch\` first" >&2
      exit 1
    fi
    grep -oE 'fn cu[A-Za-z0-9_]+\(' "$decls" | sed -E 's/fn (.*)\(/int \1(void) { return 999; }/' |
      sort -u >"$dir/link/libcuda_stub.c"
    cc -shared -Wl,-soname,libcuda.so.1 -o "$dir/link/libcuda.so" "$dir/link/libcuda_stub.c"
    echo "no NVIDIA driver here: linking against a stand-in libcuda.so (run on a GPU machine)" >&2
  fi
fi

{
  echo "# Written by scripts/cuda-toolchain.sh: source it before cargo build --features cuda."
  echo "export PATH=\"$cuda/bin:\$PATH\""
  echo "export CUDA_ROOT=\"$cuda\""
  # candle's kernels are compiled for one GPU architecture: the one nvidia-smi reports, else
  # this one (90: H100/H200). Set CUDA_COMPUTE_CAP before sourcing to choose another.
  echo "command -v nvidia-smi >/dev/null || export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
  if [ "$link" = 1 ]; then
    echo "export RUSTFLAGS=\"\${RUSTFLAGS:-} -L $dir/link\""
    echo "export LD_LIBRARY_PATH=\"$cuda/lib:$libs:\${LD_LIBRARY_PATH:-}\""
  fi
} >"$dir/env.sh"
echo "wrote $dir/env.sh" >&2
