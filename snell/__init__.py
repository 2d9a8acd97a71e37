"""SNELL: sparse tuning with kernelized LoRA, and the one interface every tuning method implements.

import timm, snell
model = timm.create_model("vit_tiny_patch16_224", num_classes=10)
snell.apply_method(model, snell.method_config("snell", rank=8, kernel="piecewise_linear", sparsity=0.9))
"""

import baselines as _baselines  # noqa: F401  (registers full, linear, bitfit, lora, spt-lora)

from .core.adapter import adapter_size_bytes, count_trainable, count_tuned, load_adapter, save_adapter
from .core.callbacks import TrainingCallback, training_callbacks
from .core.registry import (
    TuningConfig,
    apply_method,
    config_class,
    config_fields,
    config_from_dict,
    exclude_from_weight_decay,
    list_methods,
    list_valued_options,
    method_config,
    no_weight_decay,
    option_problems,
    register_method,
)
from .core.wrap import AdaptedLinear, merge
from .tuners.snell import model as _snell_method  # noqa: F401  (registers "snell")
from .tuners.snell.kernels import Kernel, build_kernel, list_kernels, register_kernel
from .tuners.snell.sparsify import sparsify, threshold

__all__ = [
    "AdaptedLinear",
    "Kernel",
    "TrainingCallback",
    "TuningConfig",
    "adapter_size_bytes",
    "apply_method",
    "build_kernel",
    "config_class",
    "config_fields",
    "config_from_dict",
    "count_trainable",
    "count_tuned",
    "exclude_from_weight_decay",
    "list_kernels",
    "list_methods",
    "list_valued_options",
    "load_adapter",
    "merge",
    "method_config",
    "no_weight_decay",
    "option_problems",
    "register_kernel",
    "register_method",
    "save_adapter",
    "sparsify",
    "threshold",
    "training_callbacks",
]
