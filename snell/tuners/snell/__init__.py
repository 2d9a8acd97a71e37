"""SNELL: sparse tuning with kernelized LoRA. ``config`` (the config dataclass), ``kernels`` and
``sparsify`` (the math), ``layer`` (``SnellLinear``, its autograd function), ``fused`` / ``_fused_kernels``
(Triton ops on CUDA), ``sampled`` (the CPU backward on kept entries), ``model`` (finds and wraps the
target layers; registers "snell"), ``analysis`` (kernel-fitting helpers for the ablations)."""
