#!/usr/bin/env bash
# The GPU checks of benchmarks/, one short script for a session lent a GPU (device tool):
#   bash benchmarks/gpu.sh    (about 8 minutes on one H100 or H200; nothing is downloaded)
# 1. diffmem's pipeline sampler against StableDiffusionPipeline.__call__ on an SD-layout
#    pipeline (64x64x4 latents, UNet widths 320,640) in float16: target ratio <= 1.10.
# 2. The exact audit on the GPU against faiss's flat index (GPU where faiss has it).
# 3. detect (defaults, with verdicts) against the first-step screen, and mitigate (the search)
#    against one audit --model, on the SD-layout pipeline (64x64x4 latents, widths 320,640,
#    64 prompts each given twice) in float16: targets <= 5 each.
# 4. audit --model split over 2 processes of one GPU each, when the machine has 2 GPUs.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 240 python benchmarks/bench_models.py --text-only --device cuda --dtype float16 \
    --latent 64 --channels 320,640
timeout 180 python benchmarks/bench_audit.py --device cuda --size 10000,100000,3072 --repeat 3
timeout 240 python benchmarks/bench_sd_layout.py --device cuda --dtype float16 --latent 64 \
    --channels 320,640 --prompts 64
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
    timeout 180 python benchmarks/bench_scale.py --parts c --device cuda --processes 2
fi
