#!/usr/bin/env bash
# Builds llama.cpp's llama-tokenize, llama-simple (for `make test-llama-cpp`) and llama-completion (for
# bench/llama_cpp.py) into .cache/llama.cpp-VERSION,
# from the copy of llama.cpp that llama-cpp-python's source package on PyPI carries (PyPI is the one
# place every tinyk machine can download from). Generic CPU flags, so the tools run on any machine of
# the same architecture. Needs cmake and a C++ compiler; takes minutes.
set -euo pipefail
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
root=.cache/llama.cpp-$version
bin=$root/build/bin
if [ -x "$bin/llama-simple" ] && [ -x "$bin/llama-tokenize" ] && [ -x "$bin/llama-completion" ]; then
    exit 0
fi
for tool in cmake c++; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build_llama_cpp: needs $tool (Debian: apt-get install cmake g++)" >&2
        exit 1
    fi
done
mkdir -p "$root"
echo "build_llama_cpp: building llama.cpp from llama-cpp-python $version's source (logs in $root)" >&2
.venv/bin/python -m pip download -q --no-deps --no-binary=:all: "llama-cpp-python==$version" -d "$root"
tar xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
cmake -S "$root/llama_cpp_python-$version/vendor/llama.cpp" -B "$root/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    >"$root/cmake.log"
cmake --build "$root/build" -j"$(nproc)" --target llama-tokenize llama-simple llama-completion >"$root/build.log"
