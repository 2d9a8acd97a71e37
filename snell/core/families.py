"""The two model families every method adapts: timm classifiers and Hugging Face causal language models.

They differ in three things a method needs to know, and in nothing else (targets are found by name in
both, ``snell.core.wrap.DEFAULT_TARGETS`` holding each family's standard names):
- the head: timm's ``get_classifier()`` (a new, randomly initialised task head) or a causal LM's
  ``get_output_embeddings()`` (``lm_head``, pretrained);
- whether the head trains by default: a new task head must; a pretrained ``lm_head`` stays frozen unless
  asked (``train_head=True``), as in PEFT and the LLM-Adapters / DoRA scripts;
- the training loss a data-driven selection (SPT, GPS) differentiates: cross-entropy of a classifier's
  logits, or the causal LM's next-token loss on its labels (-100 = ignored).
Duck-typed, so snell imports neither timm nor transformers.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Label of a token that the causal LM loss skips (padding, and the prompt when it is not trained on)."""


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face ``*ForCausalLM`` (anything with ``get_output_embeddings()`` returning a layer and no
    timm classifier)."""
    if hasattr(model, "get_classifier"):
        return False
    get_output = getattr(model, "get_output_embeddings", None)
    return callable(get_output) and isinstance(get_output(), nn.Module)


def head_module(model: nn.Module) -> nn.Module | None:
    """The model's head: timm's classifier, a causal LM's ``lm_head``, or None if it has neither."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    if is_causal_lm(model):
        return model.get_output_embeddings()
    return None


def trains_head(model: nn.Module, train_head: bool | None) -> bool:
    """Whether a method config's ``train_head`` trains the head of ``model``: None is the family's default
    (a timm classifier's new head trains, a causal LM's pretrained ``lm_head`` does not)."""
    return (not is_causal_lm(model)) if train_head is None else bool(train_head)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: the logits at position t predict label t + 1; labels of ``IGNORE_INDEX``
    do not count (what ``transformers``' causal LMs compute from ``labels=``), in float32."""
    shifted = logits[..., :-1, :].float().flatten(0, -2)
    return F.cross_entropy(shifted, labels[..., 1:].flatten(), ignore_index=IGNORE_INDEX)


def output_logits(output: Any) -> Tensor:
    """Logits of a model's forward output: the tensor itself (timm) or ``.logits`` (transformers)."""
    return output if isinstance(output, Tensor) else output.logits


def task_loss(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
    """The family's training loss of one batch: cross-entropy of a classifier's logits on class labels,
    or a causal LM's next-token loss on token labels (inputs are token ids)."""
    logits = output_logits(model(inputs))
    if is_causal_lm(model):
        return causal_lm_loss(logits, labels)
    return F.cross_entropy(logits, labels)
