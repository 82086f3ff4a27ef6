#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (and `llama-bench`, `llama-batched-bench`) from the sources
# vendored in the PyPI sdist of llama-cpp-python, for side-by-side runs against metainf
# (BENCHMARKS.md). Not run by CI. Prints the directory that holds the binaries.
#
# The build targets AVX2/FMA/F16C explicitly (plus AVX-512 where this CPU has it) with
# GGML_NATIVE off: a -march=native build died with SIGILL on this kind of VM.
#
#   scripts/build-llama-server.sh            # build (cached) and print the bin directory
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 ...      # the sdist version (default 0.3.36)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
root="$METAINF_CACHE/llama.cpp/$version"
bin="$root/build/bin"
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-batched-bench" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$root"

# cmake and ninja from PyPI, in a virtual environment of their own.
venv="$METAINF_CACHE/llama.cpp/venv"
if [ ! -x "$venv/bin/cmake" ]; then
  echo "installing cmake and ninja into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet cmake ninja
fi

src="$root/src"
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  echo "fetching the llama-cpp-python $version sdist" >&2
  tmp="$(mktemp -d)"
  "$venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -d "$tmp"
  archive="$(ls "$tmp"/llama_cpp_python-*.tar.gz | head -n 1)"
  rm -rf "$src"
  mkdir -p "$src"
  tar -xzf "$archive" -C "$src" --strip-components=1
  rm -rf "$tmp"
fi

flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
if grep -q avx512f /proc/cpuinfo; then
  flags+=(-DGGML_AVX512=ON)
  grep -q avx512_vnni /proc/cpuinfo && flags+=(-DGGML_AVX512_VNNI=ON)
  grep -q avx512_bf16 /proc/cpuinfo && flags+=(-DGGML_AVX512_BF16=ON)
fi
echo "building llama.cpp (${flags[*]})" >&2
PATH="$venv/bin:$PATH" cmake -S "$src/vendor/llama.cpp" -B "$root/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF "${flags[@]}" >&2
PATH="$venv/bin:$PATH" cmake --build "$root/build" -j "$(nproc)" \
  --target llama-server llama-bench llama-batched-bench >&2
echo "$bin"
