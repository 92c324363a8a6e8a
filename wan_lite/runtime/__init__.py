"""The memory-aware runtime: decides and applies how a model runs on this machine.

- `hardware`: what the machine has (GPU, VRAM, compute capability, RAM, disk, rough speed) and the
  named memory profiles in presets/memory_profiles/.
- `planner`: a pure function from model sizes, request and hardware to a `Plan` (quantization,
  resident/streamed blocks, idle-expert place, text-encoder placement, VAE tiles, FFN chunks, CFG
  batching) with the preflight estimate (peak VRAM, peak RAM, seconds); `leaner` after an OOM.
- `plan_cli`: `python -m wan_lite plan`.
- `quant`, `streaming` (and the tiled VAE): apply a plan to loaded models from outside.

Importing this package does no work: nothing is probed until asked.
"""
