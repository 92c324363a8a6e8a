"""One generation split across the GPUs of one host over torch.distributed (docs/multigpu.md).

group.py: the process group, its CFG x sequence layout, backends and timeouts; sequence.py: the
DiT's block-loop hook (token and batch split, gather) and the Ulysses self-attention; run.py:
one job's hooks on a pipeline on every rank; launch.py: spawning the ranks (or joining
torchrun's), failures and cancels; plan.py: split one job or run one job per GPU, and why;
throughput.py: one job per GPU from a queue.
"""

from wan_lite.parallel.group import ParallelGroup, in_group, launched_by_torchrun
from wan_lite.parallel.launch import ParallelError, generate_parallel

__all__ = ["ParallelError", "ParallelGroup", "generate_parallel", "in_group", "launched_by_torchrun"]
