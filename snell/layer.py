"""The SNELL linear layer: y = x (W0 + S(kappa(A, B)))^T, with dW never kept alive for backward.

``KernelSparseLinearFn`` is a custom autograd function that saves only the input, the factors, the
kernel's parameters and the per-group threshold. Backward recomputes dW once, then
  grad_x = g (W0 + S),   grad_S = g^T x,   (grad_A, grad_B) = vjp of S(kappa(A, B)) at grad_S.
One matmul with the merged weight replaces LoRA-style parallel branches; with branch dropout or
drop-path active in training, the same function computes only the branch (``weight=None``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.func import functional_call

from .kernels import Kernel
from .sparsify import apply_rule, threshold
from .wrap import AdaptedLinear


class KernelSparseLinearFn(torch.autograd.Function):
    """F.linear(x, weight + S(kernel(A, B)), bias), saving no out x in tensor besides ``weight`` itself."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, a, b, layer: SnellLinear, *kernel_params):
        with torch.no_grad():
            dw = layer.kernel_update(a, b, kernel_params)
            t = threshold(dw, layer.sparsity, layer.groups)
            update = apply_rule(dw, t, layer.rule)
            del dw
            merged = update if weight is None else update.add_(weight)
        ctx.layer = layer
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, weight, a, b, t, *kernel_params)
        return F.linear(x, merged.to(x.dtype), bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, a, b, t, *kernel_params = ctx.saved_tensors
        layer: SnellLinear = ctx.layer
        needs = ctx.needs_input_grad
        wants_grad = needs[3:5] + needs[6:]  # a, b, then the kernel's parameters
        inputs = (a, b, *kernel_params)
        leaves = [p.detach().requires_grad_(n) for p, n in zip(inputs, wants_grad, strict=True)]
        with torch.enable_grad():
            update = apply_rule(layer.kernel_update(leaves[0], leaves[1], leaves[2:]), t, layer.rule)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_bias = None
        if needs[0]:
            merged = update.detach() if weight is None else update.detach() + weight
            grad_x = (g @ merged.to(g.dtype)).reshape(x.shape).to(x.dtype)
        # Under autocast g may be half precision while x is not: multiply in g's dtype, as autocast would.
        grad_update = (g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(update.dtype)
        if ctx.has_weight and needs[1]:
            grad_w = grad_update
        if needs[2]:
            grad_bias = g.sum(0)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(update, wanted, grad_update) if wanted else ())
        factor_grads = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        return (grad_x, grad_w, grad_bias, factor_grads[0], factor_grads[1], None, *factor_grads[2:])


class SnellLinear(AdaptedLinear):
    """A frozen linear layer tuned by a sparsified kernelized low-rank update.

    Factors follow the paper's naming: ``lora_A`` (in x r), ``lora_B`` (out x r), both kaiming-uniform
    as in the public code (so dW != 0 at init for nonlinear kernels). ``groups`` output blocks get their
    own threshold (3 for a fused qkv: q, k and v compete separately, as in the paper).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        kernel: Kernel,
        sparsity: float,
        rule: str = "public",
        groups: int = 1,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        recompute: bool = True,
    ) -> None:
        super().__init__(base)
        self.rank, self.sparsity, self.rule, self.groups = rank, sparsity, rule, groups
        self.recompute = recompute
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(base.in_features, rank, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        for p in (self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.kernel = kernel.to(**factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._kernel_names = [n for n, _ in self.kernel.named_parameters()]

    def kernel_update(self, a: Tensor, b: Tensor, kernel_params) -> Tensor:
        """dW = kappa(a, b) with the kernel's parameters taken from ``kernel_params`` (for the vjp)."""
        if not self._kernel_names:
            return self.kernel(a, b)
        return functional_call(self.kernel, dict(zip(self._kernel_names, kernel_params, strict=True)), (a, b))

    def delta_weight(self) -> Tensor:
        """S(kappa(A, B)) in plain autograd: what ``merge`` folds in."""
        dw = self.kernel(self.lora_A, self.lora_B)
        return apply_rule(dw, threshold(dw, self.sparsity, self.groups), self.rule)

    def forward(self, x: Tensor) -> Tensor:
        branch_regularised = self.training and not (
            isinstance(self.dropout, nn.Identity) and isinstance(self.drop_path, nn.Identity)
        )
        if not branch_regularised:
            return self._linear(x, self.base.weight, self.base.bias)
        return self.base(x) + self.drop_path(self._linear(self.dropout(x), None, None))

    def _linear(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """F.linear(x, weight + S(dW), bias), with the memory trick unless ``recompute`` is off."""
        if not self.recompute:
            update = self.delta_weight()
            return F.linear(x, update if weight is None else weight + update, bias)
        params = [p for _, p in self.kernel.named_parameters()]
        return KernelSparseLinearFn.apply(x, weight, bias, self.lora_A, self.lora_B, self, *params)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, kernel={self.kernel.name}, sparsity={self.sparsity}, "
            f"rule={self.rule}, groups={self.groups}"
        )
