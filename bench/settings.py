"""The benchmark's shared settings: constants that the parsers (``bench.arguments``) show as defaults and
choices and that the commands, the records and the reports use. Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_BACKBONE = "vit_mnist_patch7_28"
EMBEDDED_WEIGHTS = Path(__file__).resolve().parent / "assets" / f"{EMBEDDED_BACKBONE}.safetensors"
"""The committed pretrained weights of the embedded backbone (``python -m bench pretrain`` writes them)."""
PRECISIONS = ("fp32", "bf16")
MEMORY_MODELS = {
    "ViT-B/16": "vit_base_patch16_224",
    "ViT-L/16": "vit_large_patch16_224",
    "ViT-H/14": "vit_huge_patch14_224",
}
"""The memory sweep's models: display name -> timm name."""
MEMORY_BATCH_SIZES = (8, 64)
LLM_MEMORY_MODELS = {"LLaMA-2-7B": "llama2_7b", "LLaMA-2-13B": "llama2_13b"}
"""The LLM memory sweep's models: display name -> ``bench.llm.models`` name (shapes from a config)."""
LLM_MEMORY_METHODS = (
    "full",
    "lora-32 (commonsense)",
    "snell-32 (commonsense)",
    "dora-32 (commonsense)",
    "gps",
)
"""The LLM memory sweep's presets of ``bench.methods.METHOD_PRESETS``, in table order."""
LLM_MEMORY_BATCH_SIZE = 16
LLM_MEMORY_SEQ_LEN = 256
"""The commonsense recipe's micro batch and cutoff length (NVlabs/DoRA ``llama2_7B_DoRA.sh``)."""
TIMELINE_METHODS = ("full", "lora", "snell", "gps")
"""The memory timeline's methods (``bench.memory.timeline.TIMELINE_PRESETS``)."""
CHECKPOINTING = ("off", "on")
"""Gradient (activation) checkpointing of every decoder layer, off or on."""
FROZEN_DTYPES = ("fp32", "bf16")
ATTENTIONS = ("fused", "explicit")
"""How a timm ViT computes attention (``bench.backbones.set_attention``)."""
GPU_CHECK_RECORD = "results/gpu/gpu-check.json"
NOTEBOOKS = (
    "01_kernels.ipynb",
    "02_sparsity_and_rank.ipynb",
    "03_memory.ipynb",
    "04_snella_allocation.ipynb",
)
NOTEBOOK_SMALL_ENV = "SNELL_NOTEBOOK_SMALL"
NOTEBOOK_RESULTS_ENV = "SNELL_RESULTS"
SLURM_KEYS = {
    "partition": str,
    "account": str,
    "qos": str,
    "constraint": str,
    "gpus_per_node": int,
    "cpus_per_task": int,
    "mem_gb": float,
    "timeout_min": int,
    "array_parallelism": int,
    "setup": list,
}
"""SLURM job settings a sweep file (``slurm:``) or the CLI may give to ``--executor submitit``.

``setup`` lists shell lines run before each job (``module load ...``); the others are sbatch settings.
"""
