"""The SNELL linear layer: y = x (W0 + S(kappa(A, B)))^T, with dW never kept alive for backward.

``KernelSparseLinearFn`` is a custom autograd function that saves only the input, the factors, the
kernel's parameters and the per-group threshold. Backward recomputes dW block by block (a few blocks,
see ``weight_blocks``), and for each block of S = S(kappa(A, B)):
  grad_S = g^T x,   (grad_A, grad_B) += vjp of S at grad_S,   grad_x += g (W0 + S).
One matmul with the merged weight replaces LoRA-style parallel branches; with branch dropout or
drop-path active in training, the same function computes only the branch (``weight=None``).
The threshold is a selection, not a sort (``snell.sparsify.threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.func import functional_call

from .kernels import Kernel
from .sparsify import apply_rule, threshold
from .wrap import AdaptedLinear, branch_dropout

BLOCK_ENTRIES = {"cpu": 2**19, "cuda": 2**22}
"""Backward recomputes dW in blocks of about this many entries per device type, so that its temporaries
(the kernel's intermediates and their vjp, the weight gradient, the merged weight) are block-sized, not
several out x in matrices. Valid because a kernel's entry dW[j, i] depends on B[j] and A[i] only.
On a CPU, 2 MiB blocks cost no time (the matmuls stay compute-bound); on a GPU each block costs some
50 kernel launches, so blocks are 8x larger there (ViT-B/16 step on an H200: 360 ms with 2**19, 112 ms
with 2**22). Other devices use the CUDA size."""


_blocks_as: str | None = None


@contextmanager
def blocks_as(device_type: str) -> Iterator[None]:
    """Split dW into the blocks of ``device_type`` whatever device the tensors are on.

    Memory estimates of a GPU step run on fake CPU tensors; inside this context their backward uses the
    GPU's block size, so that the estimated temporaries (and the time to estimate) follow the GPU's.
    """
    global _blocks_as
    previous, _blocks_as = _blocks_as, device_type
    try:
        yield
    finally:
        _blocks_as = previous


def _split(start: int, stop: int, size: int) -> list[slice]:
    """[start, stop) as about equal slices of at most about ``size``, lengths multiples of 64 but the
    last: matmuls on slices that start off a 64-entry boundary run up to 1.7x slower (MKL, measured)."""
    count = max(1, math.ceil((stop - start) / max(size, 1)))
    step = math.ceil((stop - start) / count / 64) * 64
    return [slice(lo, min(lo + step, stop)) for lo in range(start, stop, step)]


def weight_blocks(
    out_features: int, in_features: int, groups: int, device: torch.device
) -> list[tuple[slice, slice, slice]]:
    """(rows, columns, threshold groups) of the blocks of dW that backward works on.

    The longer side is split, so that blocks stay wide enough for efficient matmuls; column blocks span
    every row (and so every group), row blocks stay inside one threshold group.
    """
    entries = BLOCK_ENTRIES.get(_blocks_as or device.type, BLOCK_ENTRIES["cuda"])
    everything = slice(None)
    if in_features >= out_features or out_features * in_features <= entries:
        return [(everything, cols, everything) for cols in _split(0, in_features, entries // out_features)]
    per_group = out_features // groups
    return [
        (rows, everything, slice(group, group + 1))
        for group in range(groups)
        for rows in _split(group * per_group, (group + 1) * per_group, entries // in_features)
    ]


class KernelSparseLinearFn(torch.autograd.Function):
    """F.linear(x, weight + S(kernel(A, B)), bias), saving no out x in tensor besides ``weight`` itself."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, a, b, layer: SnellLinear, *kernel_params):
        with torch.no_grad():
            dw = layer.blockwise_update(a, b, kernel_params)
            t = threshold(dw, layer.sparsity, layer.groups)
            merged = apply_rule(dw, t, layer.rule, inplace=True)
            if weight is not None:
                merged.add_(weight)
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
        factors = (a, b, *kernel_params)
        grads = [torch.zeros_like(p) if n else None for p, n in zip(factors, wants_grad, strict=True)]
        param_leaves = [p.detach().requires_grad_(n) for p, n in zip(kernel_params, needs[6:], strict=True)]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        # Under autocast g may be half precision while x is not: multiply in g's dtype, as autocast would.
        x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
        grad_x = torch.empty_like(x2) if needs[0] else None
        grad_w = torch.empty_like(weight) if ctx.has_weight and needs[1] else None
        for rows, cols, groups in weight_blocks(b.shape[0], a.shape[0], layer.groups, b.device):
            leaves = [a[cols].detach().requires_grad_(needs[3]), b[rows].detach().requires_grad_(needs[4])]
            leaves += param_leaves
            with torch.enable_grad():
                dw = layer.kernel_update(leaves[0], leaves[1], param_leaves)
                update = apply_rule(dw, t[groups], layer.rule)
            grad_update = (g[:, rows].T @ x2[:, cols]).to(update.dtype)
            if grad_w is not None:
                grad_w[rows, cols] = grad_update
            wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            if wanted:
                block_grads = torch.autograd.grad(update, [leaves[i] for i in wanted], grad_update)
                for i, grad in zip(wanted, block_grads, strict=True):
                    (grads[i][(cols, rows)[i]] if i < 2 else grads[i]).add_(grad)  # a, b: their block's rows
            if grad_x is not None:  # the autograd graph is gone: update's storage can hold the merged block
                merged = update.detach() if weight is None else update.detach().add_(weight[rows, cols])
                first = rows.start in (None, 0)  # column blocks write their slice once, row blocks accumulate
                grad_x[:, cols].addmm_(g[:, rows], merged.to(g.dtype), beta=0 if first else 1)
        grad_x = grad_x.reshape(x.shape).to(x.dtype) if needs[0] else None
        grad_bias = g.sum(0) if needs[2] else None
        return (grad_x, grad_w, grad_bias, grads[0], grads[1], None, *grads[2:])


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
        self.dropout = branch_dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._kernel_names = [n for n, _ in self.kernel.named_parameters()]

    def kernel_update(self, a: Tensor, b: Tensor, kernel_params) -> Tensor:
        """dW = kappa(a, b) with the kernel's parameters taken from ``kernel_params`` (for the vjp)."""
        if not self._kernel_names:
            return self.kernel(a, b)
        return functional_call(self.kernel, dict(zip(self._kernel_names, kernel_params, strict=True)), (a, b))

    @torch.no_grad()
    def blockwise_update(self, a: Tensor, b: Tensor, kernel_params) -> Tensor:
        """dW computed block by block exactly as backward recomputes it, so that both agree to the bit and
        keep the same entries (a block-shaped matmul may round differently from a full-size one)."""
        blocks = weight_blocks(b.shape[0], a.shape[0], self.groups, b.device)
        if len(blocks) == 1:
            return self.kernel_update(a, b, kernel_params)
        a, b = a.detach(), b.detach()  # views of a parameter made under no_grad would still require grad
        dw = None
        for rows, cols, _ in blocks:
            block = self.kernel_update(a[cols], b[rows], kernel_params)
            if dw is None:
                dw = block.new_empty(b.shape[0], a.shape[0])
            dw[rows, cols] = block
        return dw

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
