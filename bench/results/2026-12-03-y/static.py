"""bench/profile_dit.py with models/fused.py's kernels compiled for fixed shapes (dynamic=False)."""

import runpy
import sys

import torch

orig = torch.compile
torch.compile = lambda fn, **kw: orig(fn, **{**kw, "dynamic": False})
sys.argv = ["bench/profile_dit.py", *sys.argv[1:]]
runpy.run_path("bench/profile_dit.py", run_name="__main__")
