"""The named method configurations that the memory sweep, the GPU check and the perf benchmark compare.

One table, so that "lora-8" or "snell-8 (no branch dropout)" means the same config in every table.
Each is the method's defaults (as the paper's runs: branch dropout and drop-path 0.1, SNELL sparsity
0.9, q, k and v as separate adapters; LoRA's branch drop-path, 0 by default, is set to the public code's
0.1 in "lora-8" and "lora-32", SPT budget 400k entries; GPS one entry per row with a bool gradient
mask, the public code's float32 mask being its own preset; SNELLA from 1% to 80% sparsity; PEFT's DoRA
on timm's fused qkv, one A for q, k and v, without dropout: PEFT's nn.Dropout keeps a 4-byte mask on a
CPU, which would overstate a GPU's memory) except the options named.

The "(commonsense)" presets are the LLaMA recipe's (NVlabs/DoRA ``commonsense_reasoning``, which the
SNELL paper's LLaMA appendix follows): rank 32, alpha 64, dropout 0.05 on the adapter's input; SNELL-32
with the same branch dropout, no drop-path (the recipe has none) and the library's kernel
(piecewise-linear) and sparsity (0.9). Targets are the library's defaults, on LLaMA q, k, v, o, gate,
up and down (the DoRA script adapts q, k, v, up and down).
"""

from __future__ import annotations

from typing import Any

import snell

METHOD_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "linear": ("linear", {}),
    "lora-8": ("lora", {"rank": 8, "drop_path": 0.1}),
    "lora-32": ("lora", {"rank": 32, "drop_path": 0.1}),
    "lora-8 (no branch dropout)": ("lora", {"rank": 8, "dropout": 0.0}),
    "spt-lora (index)": ("spt-lora", {"mode": "index"}),
    "spt-lora (grad mask)": ("spt-lora", {"mode": "grad_mask"}),
    "snell-8": ("snell", {"rank": 8}),
    "snell-32": ("snell", {"rank": 32}),
    "snell-8 (no branch dropout)": ("snell", {"rank": 8, "dropout": 0.0, "drop_path": 0.0}),
    "lora-32 (no branch dropout)": ("lora", {"rank": 32, "dropout": 0.0}),
    "snell-32 (no branch dropout)": ("snell", {"rank": 32, "dropout": 0.0, "drop_path": 0.0}),
    "snell-8 (no recompute)": ("snell", {"rank": 8, "recompute": False}),
    "gps": ("gps", {}),
    "gps (float32 mask)": ("gps", {"mask": "float32"}),
    "snella-8": ("snella", {"rank": 8}),
    "dora-8 (peft, no dropout)": ("peft", {"tuner": "dora", "rank": 8, "lora_dropout": 0.0}),
    "lora-32 (commonsense)": ("lora", {"rank": 32, "alpha": 64.0, "dropout": 0.05}),
    "snell-32 (commonsense)": ("snell", {"rank": 32, "dropout": 0.05, "drop_path": 0.0}),
    "dora-32 (commonsense)": ("peft", {"tuner": "dora", "rank": 32, "lora_alpha": 64, "lora_dropout": 0.05}),
}


def preset_config(label: str) -> snell.TuningConfig:
    """The validated config of a named preset; ValueError naming the allowed labels otherwise."""
    if label not in METHOD_PRESETS:
        raise ValueError(f"unknown method preset {label!r}; allowed: {', '.join(METHOD_PRESETS)}")
    method, options = METHOD_PRESETS[label]
    return snell.method_config(method, **options)
