"""The SNELL linear layer: y = x (W0 + S(kappa(A, B)))^T, with dW never kept alive for backward.

``KernelSparseLinearFn`` is a custom autograd function that saves only the input, the factors, the
kernel's parameters and the per-group threshold. Backward recomputes dW block by block (a few blocks,
see ``weight_blocks``), and for each block of S = S(kappa(A, B)):
  grad_S = g^T x,   (grad_A, grad_B) += vjp of S at grad_S,   grad_x += g (W0 + S).
One matmul with the merged weight replaces LoRA-style parallel branches; with branch dropout or
drop-path active in training, the same function computes only the branch (``weight=None``).
The threshold is a selection, not a sort (``snell.sparsify.threshold``); at sparsity 0 there is none and
S(dW) = dW (the public code's kernelized LoRA).

A fused qkv holds q, k and v as ``groups`` = 3 blocks of output rows, each with its own threshold and
drop-path; with ``shared_a=False`` (the public code's layout) each also has its own A: ``lora_A`` stacks
the three (3 in x r), ``lora_B`` (out x r) is the three B's one above the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .kernels import Kernel, init_factor_
from .sparsify import apply_rule, rule_vjp, threshold
from .wrap import AdaptedLinear, branch_drop_path, branch_dropout

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
    every row (``rows`` is ``slice(None)``: every group), row blocks stay inside one threshold group.
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
        wants = needs[3:5] + needs[6:]  # a, b, then the kernel's parameters
        grads = [
            torch.zeros_like(p) if n else None for p, n in zip((a, b, *kernel_params), wants, strict=True)
        ]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        # Under autocast g may be half precision while x is not: multiply in g's dtype, as autocast would.
        x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
        grad_x = torch.empty_like(x2) if needs[0] else None
        grad_w = torch.empty_like(weight) if ctx.has_weight and needs[1] else None
        for rows, cols, groups in weight_blocks(b.shape[0], layer.in_features, layer.groups, b.device):
            blocks = layer.a_block(a, rows, cols), layer.b_block(b, rows)
            grad_update = (g[:, rows].T @ x2[:, cols]).to(a.dtype)
            if grad_w is not None:
                grad_w[rows, cols] = grad_update
            t_block = None if t is None else t[groups]
            update, block_grads = layer.update_vjp(*blocks, kernel_params, t_block, grad_update, wants)
            for i, grad in enumerate(block_grads):
                if grad is None:
                    continue
                if i == 0:  # a, b: the rows of their block
                    layer.a_block(grads[0], rows, cols).add_(grad)
                elif i == 1:
                    layer.b_block(grads[1], rows).add_(grad)
                else:
                    grads[i].add_(grad)
            if grad_x is not None:
                merged = update if weight is None else update.add_(weight[rows, cols])
                first = rows.start in (None, 0)  # column blocks write their slice once, row blocks accumulate
                grad_x[:, cols].addmm_(g[:, rows], merged.to(g.dtype), beta=0 if first else 1)
        grad_x = grad_x.reshape(x.shape).to(x.dtype) if needs[0] else None
        grad_bias = g.sum(0) if needs[2] else None
        return (grad_x, grad_w, grad_bias, grads[0], grads[1], None, *grads[2:])


class SnellLinear(AdaptedLinear):
    """A frozen linear layer tuned by a sparsified kernelized low-rank update.

    Factors follow the paper's naming: ``lora_A`` (in x r; ``groups`` of them stacked unless
    ``shared_a``), ``lora_B`` (out x r), initialised as the public code does (``init_factor_``; dW != 0
    at init for nonlinear kernels). ``groups`` output blocks get their own threshold and drop-path
    (3 for a fused qkv: q, k and v compete separately, as in the paper).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        kernel: Kernel,
        sparsity: float,
        rule: str = "public",
        groups: int = 1,
        shared_a: bool = False,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        recompute: bool = True,
    ) -> None:
        super().__init__(base)
        self.rank, self.sparsity, self.rule, self.groups = rank, sparsity, rule, groups
        self.factor_groups = 1 if shared_a else groups
        self.recompute = recompute
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.factor_groups * base.in_features, rank, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        self.kernel = kernel.to(**factory)
        init_factor_(self.lora_A.view(self.factor_groups, base.in_features, rank), kernel)
        init_factor_(self.lora_B.view(groups, -1, rank), kernel)
        self.dropout = branch_dropout(dropout)
        self.drop_path = branch_drop_path(drop_path, groups)
        self._kernel_names = [n for n, _ in self.kernel.named_parameters()]

    def _factor_group(self, rows: slice) -> tuple[int, int]:
        """(factor group, its first row) of a block of rows inside one threshold group."""
        per_group = self.out_features // self.factor_groups
        group = rows.start // per_group
        return group, group * per_group

    def a_block(self, a: Tensor, rows: slice, cols: slice) -> Tensor:
        """What dW[rows, cols] reads of ``lora_A`` (or of a tensor shaped like it): (groups, cols, r)."""
        stacked = a.view(self.factor_groups, self.in_features, a.shape[-1])
        if rows.start is None:
            return stacked[:, cols]
        group, _ = self._factor_group(rows)
        return stacked[group : group + 1, cols]

    def b_block(self, b: Tensor, rows: slice) -> Tensor:
        """What dW[rows, :] reads of ``lora_B`` (or of a tensor shaped like it): (groups, rows, r)."""
        stacked = b.view(self.factor_groups, -1, b.shape[-1])
        if rows.start is None:
            return stacked
        group, first = self._factor_group(rows)
        return stacked[group : group + 1, rows.start - first : rows.stop - first]

    def kernel_update(self, a: Tensor, b: Tensor, kernel_params) -> Tensor:
        """dW block = kappa(a, b) for factor blocks from ``a_block`` / ``b_block``, with the kernel's
        parameters taken from ``kernel_params`` (for the vjp): (rows, cols)."""
        if self._kernel_names:
            named = dict(zip(self._kernel_names, kernel_params, strict=True))
            dw = functional_call(self.kernel, named, (a, b))
        else:
            dw = self.kernel(a, b)
        return dw.reshape(-1, a.shape[-2])

    def update_vjp(
        self, a: Tensor, b: Tensor, kernel_params, t: Tensor | None, grad: Tensor, wants: tuple[bool, ...]
    ) -> tuple[Tensor, list[Tensor | None]]:
        """S(dW) of one block (a fresh tensor) and the gradients of a, b and the kernel's parameters that
        ``wants`` asks for, given ``grad`` reaching S: in closed form where the kernel has one (no
        autograd graph, a few block-sized temporaries), else by autograd through ``kernel_update``."""
        if not any(wants):
            with torch.no_grad():
                return apply_rule(self.kernel_update(a, b, kernel_params), t, self.rule).clone(), []
        with torch.no_grad():
            closed = self.kernel.closed_form(a, b)
        if closed is not None:
            with torch.no_grad():
                dw, vjp = closed
                found = vjp(rule_vjp(dw, t, self.rule, grad).view(dw.shape))
                update = apply_rule(dw.reshape(-1, a.shape[-2]), t, self.rule, inplace=True)
            grads = [*found[:2], *found[2]]
            return update, [grad if want else None for grad, want in zip(grads, wants, strict=True)]
        leaves = [f.detach().requires_grad_(w) for f, w in zip((a, b, *kernel_params), wants, strict=True)]
        with torch.enable_grad():
            update = apply_rule(self.kernel_update(leaves[0], leaves[1], leaves[2:]), t, self.rule)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad(update, wanted, grad))
        return update.detach(), [next(found) if leaf.requires_grad else None for leaf in leaves]

    @torch.no_grad()
    def blockwise_update(self, a: Tensor, b: Tensor, kernel_params) -> Tensor:
        """dW computed block by block exactly as backward recomputes it, so that both agree to the bit and
        keep the same entries (a block-shaped matmul may round differently from a full-size one)."""
        a, b = a.detach(), b.detach()  # views of a parameter made under no_grad would still require grad
        blocks = weight_blocks(b.shape[0], self.in_features, self.groups, b.device)
        if len(blocks) == 1:
            rows, cols, _ = blocks[0]
            return self.kernel_update(self.a_block(a, rows, cols), self.b_block(b, rows), kernel_params)
        dw = None
        for rows, cols, _ in blocks:
            block = self.kernel_update(self.a_block(a, rows, cols), self.b_block(b, rows), kernel_params)
            if dw is None:
                dw = block.new_empty(b.shape[0], self.in_features)
            dw[rows, cols] = block
        return dw

    def delta_weight(self) -> Tensor:
        """S(kappa(A, B)) in plain autograd: what ``merge`` folds in."""
        everything = slice(None)
        dw = self.kernel_update(
            self.a_block(self.lora_A, everything, everything),
            self.b_block(self.lora_B, everything),
            [p for _, p in self.kernel.named_parameters()],
        )
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
            f"rule={self.rule}, groups={self.groups}, factor_groups={self.factor_groups}"
        )
