#!/usr/bin/env bash
# Builds the peers once into the cache, keyed by version, and prints their paths:
# llama.cpp's llama-server and llama-bench from the copy vendored in the PyPI sdist
# llama-cpp-python (same flags as kilnd's build: AVX2/FMA/F16C, no OpenMP, Release),
# and Debian's bmaptool and mkosi.
set -euo pipefail

cache=${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
llama_py_version=0.3.36
dir=$cache/bench/llama-cpp-python-$llama_py_version
bin=$dir/build/bin

if [[ ! -x $bin/llama-server || ! -x $bin/llama-bench ]]; then
  mkdir -p "$dir"
  if [[ ! -d $dir/src ]]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$dir/sdist" \
      "llama-cpp-python==$llama_py_version"
    mkdir -p "$dir/src.part"
    tar -xzf "$dir"/sdist/llama_cpp_python-"$llama_py_version".tar.gz -C "$dir/src.part" --strip-components=1
    mv "$dir/src.part" "$dir/src"
  fi
  # Never -march=native: the build machine may advertise features its VM does not grant.
  cmake -S "$dir/src/vendor/llama.cpp" -B "$dir/build" -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX=ON -DGGML_OPENMP=OFF \
    -DCMAKE_BUILD_TYPE=Release >"$dir/cmake-configure.log"
  cmake --build "$dir/build" --target llama-server llama-bench -j"$(nproc)" >"$dir/cmake-build.log"
fi

# Debian's bmaptool, and mkosi (14 in bookworm), the other declarative image builder: tried
# on an equivalent image in the builder section. An empty package list is fetched first.
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
if ! command -v bmaptool >/dev/null; then
  apt_install --no-install-recommends bmap-tools || { apt-get update -q >/dev/null && apt_install --no-install-recommends bmap-tools; }
fi
if ! command -v mkosi >/dev/null; then
  apt_install mkosi || { apt-get update -q >/dev/null && apt_install mkosi; }
fi

echo "llama_server=$bin/llama-server"
echo "llama_bench=$bin/llama-bench"
echo "bmaptool=$(command -v bmaptool)"
echo "mkosi=$(command -v mkosi)"
