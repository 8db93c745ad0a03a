#!/usr/bin/env bash
# Reproduce BENCHMARKS.md on NVIDIA GPUs in one command: lorafit vs TRL SFTTrainer + PEFT, LoRA and QLoRA,
# 1 GPU and 2 GPUs (torchrun), a random Phi-3-mini-shaped model, offline; writes BENCHMARKS-cuda.md.
#
#   pip install -e ".[bench,qlora]" && bench/gpu.sh
#   bench/gpu.sh --device cpu --dry-run      # the plan only (what tests/test_gpu_bench.py runs)
#
# Options: see `bench/gpu.sh --help` (bench/gpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m bench.gpu "$@"
