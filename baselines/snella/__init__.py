"""SNELLA (the SNELL authors' follow-up) and MixK, as PEFT lays out a tuner: ``config.py`` (options),
``kernel.py`` (the piecewise-softmax kernel), ``allocator.py`` (layer-level sparsity competition, a
training callback) and ``model.py`` (apply: wrap targets, attach the allocator)."""

from . import kernel, model  # noqa: F401  (registers the kernel and the methods)
