"""Pure torch model math: the Wan 2.2 DiT, both VAEs, the text encoder and attention kernels.

Nothing in this package places tensors on devices, uses autocast or probes hardware; modules are
built on the `meta` device and filled by `wan_lite.loading.build.fill_module`.
"""
