#!/usr/bin/env bash
# Install the peer systems into .peers/ (never a dependency of flover_jax itself):
#   .peers/llama.cpp/build/bin/llama-server   built from the llama.cpp sources in the
#                                             llama-cpp-python sdist
#   .peers/hf/                                a venv with transformers + torch (CPU)
# Idempotent: each part is skipped once its output exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PEERS=.peers
mkdir -p "$PEERS"

if [ ! -x "$PEERS/llama.cpp/build/bin/llama-server" ]; then
  rm -rf "$PEERS/sdist" "$PEERS/llama.cpp"
  mkdir -p "$PEERS/sdist"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$PEERS/sdist" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar -xzf "$PEERS"/sdist/llama_cpp_python-*.tar.gz -C "$PEERS/sdist"
  mv "$PEERS"/sdist/llama_cpp_python-*/vendor/llama.cpp "$PEERS/llama.cpp"
  echo "llama.cpp from the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist" > "$PEERS/llama.cpp/SOURCE"
  # The native build's AMX path crashes on this CPU (MACHINE.md): pin the ISA by hand.
  cmake -S "$PEERS/llama.cpp" -B "$PEERS/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
  cmake --build "$PEERS/llama.cpp/build" -j "$(nproc)" --target llama-server llama-quantize
fi

if [ ! -f "$PEERS/hf/.installed" ]; then
  python3 -m venv "$PEERS/hf"
  "$PEERS/hf/bin/pip" install -q --upgrade pip
  # torch 2.13.0 CPU: the wheel already on this machine's disk (MACHINE.md); never a CUDA build.
  "$PEERS/hf/bin/pip" install -q torch==2.13.0
  "$PEERS/hf/bin/pip" install -q 'transformers>=5.0,<6' accelerate gguf numpy
  touch "$PEERS/hf/.installed"
fi
echo "peers ready in $PEERS"
