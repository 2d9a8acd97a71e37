"""What the memory sweeps cover (ViTs; LLaMA-2 under the commonsense recipe), and the SNELL paper's figures
the ViT sweep is compared with."""

from __future__ import annotations

from bench.settings import LLM_MEMORY_MODELS, MEMORY_MODELS

MODELS = MEMORY_MODELS
METHODS = (
    "full",
    "linear",
    "lora-8",
    "lora-8 (no branch dropout)",
    "lora-32",
    "spt-lora (index)",
    "spt-lora (grad mask)",
    "snell-8",
    "snell-32",
    "snell-8 (no recompute)",
    "snella-8",
    "dora-8 (peft, no dropout)",
    "gps",
    "gps (float32 mask)",
)
"""The swept presets of ``bench.methods.METHOD_PRESETS``, in table order."""
PAPER_MB = {
    "ViT-B/16": {"gps": 2428, "lora-8": 1546, "snell-8": 1673},
    "ViT-L/16": {"gps": 7522, "lora-8": 4325, "snell-8": 4519},
    "ViT-H/14": {"gps": 16119, "lora-8": 9325, "snell-8": 9692},
}
"""Peak training memory in the SNELL paper's tables (batch 8; GPS is its sparse-tuning baseline)."""
PAPER_BATCH = 8
PAPER_ATTENTION = "explicit"
"""The attention of the public SNELL and GPS code, whose memory the paper reports
(``bench.backbones.set_attention``)."""

LLM_MODELS = LLM_MEMORY_MODELS
LLM_METHOD_NAMES = {
    "full": "full",
    "lora-32 (commonsense)": "LoRA-32",
    "snell-32 (commonsense)": "SNELL-32",
    "dora-32 (commonsense)": "DoRA-32",
    "gps": "GPS",
}
"""The LLM sweep's presets (``bench.settings.LLM_MEMORY_METHODS``) -> their names in its table."""
LLM_BASELINE = "lora-32 (commonsense)"
"""The preset every LLM estimate is divided by (same model and checkpointing)."""
