"""One adapted layer's forward + backward: LoRA-8, SNELL-8 and the reference SNELL-8 (same factors)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from baselines.lora import LoraLinear
from bench.perf.reference_snell import ReferenceSnellLinear
from snell.tuners.snell.kernels import build_kernel
from snell.tuners.snell.layer import SnellLinear

TOKENS = 8 * 197  # ViT-B/16 at batch 8
SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # out x in: proj, fc1, fc2


def snell_layer(base: nn.Linear) -> SnellLinear:
    return SnellLinear(base, 8, build_kernel("piecewise_linear", 8), 0.9)


LAYERS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "lora": lambda base: LoraLinear(base, 8, 8.0, 0.0),
    "snell": snell_layer,
    "reference": lambda base: ReferenceSnellLinear(snell_layer(base)),
}
"""Each compared layer, built around a base layer."""


@pytest.mark.parametrize("method", list(LAYERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_forward_backward(measure, benchmark, method, shape):
    benchmark.group = f"layer fwd+bwd {shape[0]}x{shape[1]}, {TOKENS} tokens"
    torch.manual_seed(0)
    layer = LAYERS[method](nn.Linear(shape[1], shape[0]))
    x = torch.randn(TOKENS, shape[1], requires_grad=True)
    grad = torch.randn(TOKENS, shape[0])

    def step() -> None:
        layer(x).backward(grad)

    step()
    assert x.grad is not None and layer.lora_B.grad is not None
    measure(step)
