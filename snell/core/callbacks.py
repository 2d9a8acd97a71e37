"""The one hook for methods that adapt during training (SNELLA's sparsity allocator is one).

A method that changes itself while it trains adds a ``TrainingCallback`` module to the model it tunes;
the training step and loop find every callback by type (``training_callbacks``) and call it: after each
optimizer step (gradients still present) and at the end of each epoch. Being modules, callbacks move
with ``model.to(...)`` and their buffers count in memory estimates, like any other part of the method.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class TrainingCallback(nn.Module):
    """Base class: override what the method needs. Calls come from ``bench.step.train_step`` (each step)
    and ``bench.run.train.train_run`` (each epoch); any training loop may make them the same way."""

    def after_optimizer_step(self) -> None:
        """Called after ``optimizer.step()``, before the gradients are cleared."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called after epoch ``epoch`` (0-based) of ``epochs`` has finished."""

    def record(self) -> dict[str, Any]:
        """JSON-ready facts for the run's record (e.g. what was allocated at each epoch)."""
        return {}


def training_callbacks(model: nn.Module) -> list[TrainingCallback]:
    """Every ``TrainingCallback`` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, TrainingCallback)]
