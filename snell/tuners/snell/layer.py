"""The SNELL linear layer: y = x (W0 + S(kappa(A, B)))^T, with dW never kept alive for backward.

``KernelSparseLinearFn`` is a custom autograd function that saves only the inputs, the factors, the
kernel's parameters and the per-group threshold. Backward recomputes dW block by block (a few blocks,
see ``weight_blocks``), and for each block of S = S(kappa(A, B)):
  grad_S = g^T x,   (grad_A, grad_B) = vjp of S at grad_S,   grad_x += g (W0 + S).
The vjp is in closed form for the piecewise-linear kernel (``Kernel.closed_form``), autograd otherwise.
Without branch dropout one matmul with the merged weight replaces LoRA-style parallel branches, drop-path
included (the batch split per q/k/v group: kept samples use W0 + S / (1 - p)); with branch dropout the
frozen matmul and the branch (its output scaled by the drop-path draws) run in the same function.
The threshold is a selection, not a sort (``snell.tuners.snell.sparsify.threshold``); at sparsity 0 there
is none and
S(dW) = dW (the public code's kernelized LoRA).

On the CUDA code path (``code_path``) the piecewise-linear kernel with fixed coefficients runs the fused
Triton ops of ``snell.tuners.snell.fused`` instead: |dW| for the threshold, W0 + S and the vjp computed
from the
factors tile by tile, the whole matrix as one block, about 11 ops per layer for forward and backward.

A fused qkv holds q, k and v as ``groups`` = 3 blocks of output rows, each with its own threshold and
drop-path; with ``shared_a=False`` (the public code's layout) each also has its own A: ``lora_A`` stacks
the three (3 in x r), ``lora_B`` (out x r) is the three B's one above the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.func import functional_call

from snell.core.wrap import AdaptedLinear, branch_drop_path, branch_dropout

from . import fused
from .kernels import Kernel, PiecewiseLinearKernel, init_factor_
from .sampled import Entries
from .sparsify import apply_rule, kept_mask, rule_at, rule_vjp, threshold

BLOCK_ENTRIES = {"cpu": 2**19, "cuda": 2**20}
"""Backward recomputes dW in blocks of about this many entries per device type, so that its temporaries
(the kernel's intermediates and their vjp, the weight gradient, the merged weight) are block-sized, not
several out x in matrices. Valid because a kernel's entry dW[j, i] depends on B[j] and A[i] only (or, for
``Kernel.whole_columns`` kernels, on its column: blocks of whole columns). On a CPU, 2 MiB blocks cost no
time (the matmuls stay compute-bound). On a GPU each block costs some 50 kernel launches, so blocks are
larger there; the piecewise-linear kernel runs the fused ops there (one block), so this size serves the
other kernels: 4 MiB blocks keep SNELLA's softmax kernel within 1% of SNELL-8's memory (ViT-B/16 batch 8
estimate; 16 MiB blocks: 4%), with 3 blocks for a ViT-B/16 fc1. Other devices use the CUDA size."""


SAMPLED_MIN_SPARSITY = 0.75
"""On a CPU, backward computes the update's gradient g^T x only at the kept entries (a sampled product,
``torch.sparse.sampled_addmm``; every rule passes no gradient to the others) where a layer drops at least
this share of dW: at s = 0.9 on ViT widths with 2080 tokens the sampled product takes 0.3-0.6x the dense
matmul's time (measured on the CPU benchmark's shapes); its cost grows with the kept share, the dense
matmul's does not."""
SAMPLED_MIN_TOKENS_PER_RANK = 64
"""... and where a step has at least this many tokens per rank: the work on the kept entries (their gathered
rows of A and B, r floats each) pays for itself through the tokens the sampled g^T x skips. Measured: 2080
tokens at r = 8 (ViT) gain, 64 tokens at r = 32 (LLaMA-2-7B width: 53 s against the dense 24 s) lose."""

GATHERED_WHOLE_FLOATS = 2**20
"""The backward on kept entries takes a layer in one block up to this many floats of gathered rows: one
block saves the blocks' repeated operand copies and input-gradient sums (measured on the CPU ViT: faster,
and a 2.5% lower step peak than 2 MiB blocks)."""

_code_path: str | None = None


@contextmanager
def code_path(device_type: str) -> Iterator[None]:
    """Run SNELL's code path for ``device_type`` whatever device the tensors are on: its block size, its
    threshold route and, for "cuda", the fused Triton ops (``snell.tuners.snell.fused``) where they apply.

    Memory estimates of a GPU step run on fake CPU tensors: inside this context they follow the GPU's
    code (the fused ops' fake implementations, the GPU's blocks), so that the estimated temporaries are
    the GPU's. Tests run the CUDA path on CPU tensors this way, in Triton's interpreter.
    """
    global _code_path
    previous, _code_path = _code_path, device_type
    try:
        yield
    finally:
        _code_path = previous


def device_type_of(device: torch.device) -> str:
    """The device type whose code path runs for tensors on ``device`` (see ``code_path``)."""
    return _code_path or device.type


def _split(start: int, stop: int, size: int) -> list[slice]:
    """[start, stop) as about equal slices of at most about ``size``, lengths multiples of 64 but the
    last: matmuls on slices that start off a 64-entry boundary run up to 1.7x slower (MKL, measured)."""
    count = max(1, math.ceil((stop - start) / max(size, 1)))
    step = math.ceil((stop - start) / count / 64) * 64
    return [slice(lo, min(lo + step, stop)) for lo in range(start, stop, step)]


def weight_blocks(
    out_features: int,
    in_features: int,
    groups: int,
    device: torch.device,
    *,
    whole: bool = False,
    whole_columns: bool = False,
) -> list[tuple[slice, slice, slice]]:
    """(rows, columns, threshold groups) of the blocks of dW that backward works on.

    The longer side is split, so that blocks stay wide enough for efficient matmuls; column blocks span
    every row (``rows`` is ``slice(None)``: every group), row blocks stay inside one threshold group.
    ``whole``: one block, the whole matrix (the fused ops keep no block-sized temporaries; see
    ``SnellLinear.blocks`` for the backward on kept entries).
    ``whole_columns``: column blocks only (the kernel couples the entries of a column).
    """
    everything = slice(None)
    if whole:
        return [(everything, everything, everything)]
    entries = BLOCK_ENTRIES.get(device_type_of(device), BLOCK_ENTRIES["cuda"])
    if whole_columns or in_features >= out_features or out_features * in_features <= entries:
        return [(everything, cols, everything) for cols in _split(0, in_features, entries // out_features)]
    per_group = out_features // groups
    return [
        (rows, everything, slice(group, group + 1))
        for group in range(groups)
        for rows in _split(group * per_group, (group + 1) * per_group, entries // in_features)
    ]


@dataclass(frozen=True)
class Part:
    """Output rows that share a drop-path draw, split into the samples that keep the branch (scaled by
    ``scale`` = 1 / (1 - p)) and those that drop it; all samples kept, unscaled, without drop-path."""

    rows: slice
    kept: Tensor | None
    """Sample indices (dim 0) that keep the branch; None: every sample."""
    dropped: Tensor | None
    scale: float


def parts(layer: SnellLinear, keep: Tensor | None, device: torch.device) -> list[Part]:
    """The drop-path parts of one step: one per threshold group, from ``keep`` ((samples, groups) 0/1
    draws on the CPU, so that splitting the batch needs no device sync), or one part of all rows."""
    if keep is None:
        return [Part(slice(None), None, None, 1.0)]
    per_group = layer.out_features // layer.groups
    scale = 1.0 / (1.0 - layer.drop_path.p)
    found = []
    for group in range(layer.groups):
        rows = slice(group * per_group, (group + 1) * per_group)
        if is_fake(keep):  # a memory estimate has no draws: the expected split, kept samples first
            kept = round(keep.shape[0] * (1.0 - layer.drop_path.p))
            found.append(Part(rows, torch.arange(kept, device=device),
                              torch.arange(kept, keep.shape[0], device=device), scale))  # fmt: skip
            continue
        draws = keep[:, group]
        indices = [(draws == value).nonzero().squeeze(1) for value in (1, 0)]
        if device.type == "cuda":
            indices = [i.pin_memory().to(device, non_blocking=True) for i in indices]
        found.append(Part(rows, *indices, scale))
    return found


def keep_all(found: list[Part]) -> bool:
    """Whether the parts are the one part of every row and every sample (no drop-path split)."""
    return len(found) == 1 and found[0].kept is None


def branch_scale(layer: SnellLinear, keep: Tensor, like: Tensor) -> Tensor:
    """The drop-path multipliers (0 or 1 / (1 - p)) of a branch's output: (samples, 1, ..., groups, 1)."""
    scale = keep.to(like.dtype).div_(1.0 - layer.drop_path.p)
    if like.is_cuda:
        scale = scale.pin_memory()
    return scale.to(like.device, non_blocking=True).view(
        keep.shape[0], *[1] * (like.ndim - 2), layer.groups, 1
    )


def _overlap(rows: slice, part: Part, out_features: int) -> tuple[slice, slice] | None:
    """(absolute rows, rows local to the block) where a block of rows and a part's rows overlap."""
    lo_block, hi_block, _ = rows.indices(out_features)
    lo_part, hi_part, _ = part.rows.indices(out_features)
    lo, hi = max(lo_block, lo_part), min(hi_block, hi_part)
    return None if lo >= hi else (slice(lo, hi), slice(lo - lo_block, hi - lo_block))


def _samples(t: Tensor, index: Tensor | None, cols: slice = slice(None)) -> Tensor:
    """The samples ``index`` (all if None: a view) of ``t`` (samples first), columns ``cols``, as 2-D rows."""
    if index is None:
        return t.reshape(-1, t.shape[-1])[:, cols]
    picked = t[..., cols].index_select(0, index)
    return picked.reshape(-1, picked.shape[-1])


class KernelSparseLinearFn(torch.autograd.Function):
    """y = x W0^T + bias + drop_path(branch_x S^T), S = S(kernel(A, B)), saving no out x in tensor.

    ``branch_x`` None (no branch dropout): the one-matmul form, y = x (W0 + drop_path(S))^T, where
    drop-path splits the batch: samples that keep a group's branch use W0 + S / (1 - p) for its rows,
    the others W0. With ``branch_x`` (the dropped input) the frozen matmul runs on x and the branch on
    ``branch_x``, its output scaled by the drop-path draws. ``keep``: (samples, groups) draws or None.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, branch_x, weight, bias, a, b, layer: SnellLinear, keep, *kernel_params):
        merged = branch_x is None
        with torch.no_grad():
            one_matmul = merged and keep is None
            full_precision = x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(
                "cpu"
            )
            gathered = full_precision and layer.gathers(b, x.numel() // x.shape[-1])
            add = weight if one_matmul else None
            t, update, index = layer.sparse_update(a, b, kernel_params, add, record_kept=gathered)
            found = parts(layer, keep if merged else None, x.device)
            scale = None if merged or keep is None else branch_scale(layer, keep, x)
            if one_matmul:
                y = F.linear(x, update.to(x.dtype), bias)
            elif merged:
                y = x.new_empty(*x.shape[:-1], layer.out_features)
                for part in found:
                    bias_rows = None if bias is None else bias[part.rows]
                    kept = update[part.rows].mul_(part.scale).add_(weight[part.rows]).to(x.dtype)
                    y[part.kept, ..., part.rows] = F.linear(x[part.kept], kept, bias_rows)
                    y[part.dropped, ..., part.rows] = F.linear(x[part.dropped], weight[part.rows], bias_rows)
            else:
                y = F.linear(x, weight, bias)
                branch = F.linear(branch_x, update.to(x.dtype))
                if scale is None:
                    y += branch
                else:
                    y.unflatten(-1, (layer.groups, -1)).addcmul_(
                        branch.unflatten(-1, (layer.groups, -1)), scale
                    )
        ctx.layer, ctx.parts, ctx.x_dtype = layer, found, x.dtype
        ctx.save_for_backward(x if merged else None, branch_x, weight, a, b, t, scale, index, *kernel_params)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, branch_x, weight, a, b, t, scale, index, *kernel_params = ctx.saved_tensors
        layer: SnellLinear = ctx.layer
        merged = branch_x is None
        # Under autocast g may be half precision while x is not: multiply in g's dtype, as autocast would.
        g = grad_out
        if scale is not None:  # the branch's drop-path, on its output gradient
            g = (g.unflatten(-1, (layer.groups, -1)) * scale).flatten(-2)
        source = (x if merged else branch_x).to(g.dtype)
        step = _Backward(layer, ctx.parts, weight, (a, b, *kernel_params), t, index, g, source, merged)
        return step.gradients(grad_out, ctx.needs_input_grad, ctx.x_dtype, branch_x)


@dataclass(frozen=True, eq=False)
class _Backward:
    """The backward of one ``KernelSparseLinearFn`` step, block by block: ``g`` is the output gradient
    (the branch's drop-path applied), ``source`` the input of the matmul with S in g's dtype (x merged,
    else branch_x), ``params`` a, b and the kernel's parameters."""

    layer: SnellLinear
    parts: list[Part]
    weight: Tensor
    params: tuple[Tensor, ...]
    t: Tensor | None
    index: Tensor | None
    g: Tensor
    source: Tensor
    merged: bool

    @property
    def one_matmul(self) -> bool:
        """W0 + S for every sample."""
        return self.merged and keep_all(self.parts)

    def gradients(
        self, grad_out: Tensor, needs: tuple[bool, ...], x_dtype: torch.dtype, branch_x: Tensor | None
    ) -> tuple:
        """``KernelSparseLinearFn.backward``'s gradients. Each block's temporaries live until the next
        block's replace them, the last block's until the end (as the memory estimates count them)."""
        layer, weight, g, merged = self.layer, self.weight, self.g, self.merged
        wants = needs[4:6] + needs[8:]  # a, b, then the kernel's parameters
        blocks = layer.blocks(self.params[1], gathered=self.index is not None)
        single = len(blocks) == 1  # block gradients are the gradients: nothing to accumulate
        grads = [
            torch.zeros_like(p) if n and not single else None for p, n in zip(self.params, wants, strict=True)
        ]
        whole = single and keep_all(self.parts)  # else input gradients accumulate block by block
        grad_x = torch.zeros_like(self.source) if merged and needs[0] and not whole else None
        grad_branch = torch.zeros_like(self.source) if not merged and needs[1] and not whole else None
        for rows, cols, groups in blocks:
            overlaps = [(part, *o) for part in self.parts if (o := _overlap(rows, part, layer.out_features))]
            entries = None  # the previous block's go before this block's are made
            entries = self._entries(rows, cols)
            update, block_grads = self._block_vjp(rows, cols, groups, overlaps, entries, wants)
            self._add_block_grads(grads, block_grads, rows, cols, single)
            if whole:  # one block, every sample: the input gradient is one matmul
                if needs[0 if merged else 1]:
                    input_grad = (g.reshape(-1, g.shape[-1]) @ update.to(g.dtype)).view(self.source.shape)
                    grad_x, grad_branch = (input_grad, None) if merged else (grad_x, input_grad)
                continue
            target = grad_x if merged else grad_branch
            if target is not None:
                frozen = self._accumulate_input(target, update, overlaps, cols)  # noqa: F841 (kept alive)
        if needs[0] and not merged:  # the frozen matmul's input gradient, after the blocks' temporaries
            grad_x = grad_out @ weight.to(grad_out.dtype)
        grad_x = None if grad_x is None else grad_x.to(x_dtype)
        grad_branch = None if grad_branch is None else grad_branch.to(branch_x.dtype)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if needs[3] else None
        return (grad_x, grad_branch, None, grad_bias, grads[0], grads[1], None, None, *grads[2:])

    def _entries(self, rows: slice, cols: slice) -> Entries | None:
        """The kept entries of a block, where forward recorded them (``index``)."""
        if self.index is None:
            return None
        spans = ((rows, self.layer.out_features), (cols, self.layer.in_features))
        return Entries.from_index(self.index, self.layer.in_features, *[s.indices(n)[:2] for s, n in spans])

    def _block_vjp(
        self, rows: slice, cols: slice, groups: slice, overlaps: list, entries: Entries | None, wants
    ) -> tuple[Tensor, list[Tensor | None]]:
        """S of one block (+ W0's block in the one-matmul form) and its parameters' gradients."""
        layer = self.layer
        a, b, *kernel_params = self.params
        shape = (_length(rows, layer.out_features), _length(cols, layer.in_features))
        return layer.update_vjp(
            layer.a_block(a, rows, cols),
            layer.b_block(b, rows),
            kernel_params,
            None if self.t is None else self.t[groups],
            WeightGrad(self.g, self.source, overlaps, shape, cols, a.dtype),
            wants,
            add=self.weight[rows, cols] if self.one_matmul else None,
            entries=entries,
        )

    def _add_block_grads(
        self, grads: list[Tensor | None], block_grads: list[Tensor | None], rows: slice, cols: slice, single
    ) -> None:
        """Add one block's parameter gradients to ``grads`` (or take them as they are, one block)."""
        for i, grad in enumerate(block_grads):
            if grad is None:
                continue
            if single:
                grads[i] = grad.reshape(self.params[i].shape)
            elif i == 0:  # a, b: the rows of their block
                self.layer.a_block(grads[0], rows, cols).add_(grad)
            elif i == 1:
                self.layer.b_block(grads[1], rows).add_(grad)
            else:
                grads[i].add_(grad)

    def _accumulate_input(self, target: Tensor, update: Tensor, overlaps: list, cols: slice) -> Tensor | None:
        """target += g (W0 + S / (1 - p)) over one block (g W0 for dropped samples; g S for a branch).
        Returns the last frozen block in g's dtype, for the caller to keep alive as before the split."""
        g, weight, frozen = self.g, self.weight, None
        for part, absolute, local in overlaps:
            kept_weight = update[local] if part.scale == 1.0 else update[local].mul_(part.scale)
            if self.merged and not self.one_matmul:
                kept_weight.add_(weight[absolute, cols])
            _accumulate(target, part.kept, cols, _samples(g, part.kept, absolute), kept_weight.to(g.dtype))
            if self.merged and part.dropped is not None:
                frozen = weight[absolute, cols].to(g.dtype)
                _accumulate(target, part.dropped, cols, _samples(g, part.dropped, absolute), frozen)
        return frozen


def _length(part: slice, size: int) -> int:
    start, stop, _ = part.indices(size)
    return stop - start


@dataclass(frozen=True)
class WeightGrad:
    """The gradient reaching S over one block of dW, g^T x from the samples of each drop-path part that
    overlaps the block (scaled by it), computed when asked: every entry (``dense()``), only the kept ones
    of a mask (``dense(kept)``, zeros elsewhere; dense for a half-precision g, as autocast may give) or
    of ``Entries`` (``at``, their values, in float32 or float64). The sampled forms
    (``snell.tuners.snell.sampled``)
    cost in proportion to the kept entries."""

    g: Tensor
    source: Tensor
    overlaps: list
    shape: tuple[int, int]
    cols: slice
    dtype: torch.dtype
    """The factors' dtype: what every form returns."""

    @property
    def tokens(self) -> int:
        """Rows of the layer's input in this step (tokens), which the weight gradient sums over."""
        return self.g.numel() // self.g.shape[-1]

    def dense(self, kept: Tensor | None = None) -> Tensor:
        if kept is not None and self.g.dtype in (torch.float32, torch.float64):
            return self.g.new_zeros(self.shape, dtype=self.dtype).masked_scatter_(
                kept, self.at(Entries.from_mask(kept))
            )
        grad = self.g.new_empty(self.shape)
        for part, absolute, local in self.overlaps:
            left, right = _samples(self.g, part.kept, absolute).T, _samples(self.source, part.kept, self.cols)
            torch.mm(left, right, out=grad[local])
            if part.scale != 1.0:
                grad[local].mul_(part.scale)
        return grad.to(self.dtype)

    def at(self, entries: Entries) -> Tensor:
        values = []
        for part, absolute, local in self.overlaps:
            found = entries.product(*self._operands(part, absolute), local)
            values.append(found if part.scale == 1.0 else found.mul_(part.scale))
        return (values[0] if len(values) == 1 else torch.cat(values)).to(self.dtype)

    def _operands(self, part: Part, rows: slice) -> tuple[Tensor, Tensor]:
        """g^T and x of a part, laid out as the sampled product's dot products read them (tokens
        contiguous in both: g^T contiguous, x the transpose of a contiguous x^T). A slice is first made
        contiguous: torch transposes a whole contiguous matrix in cache blocks, a slice 3-4x slower."""
        dtype = torch.promote_types(self.g.dtype, torch.float32)
        left = _samples(self.g, part.kept, rows).to(dtype).contiguous().T.contiguous()
        right = _samples(self.source, part.kept, self.cols).to(dtype).contiguous().T.contiguous().T
        return left, right


def _accumulate(target: Tensor, samples: Tensor | None, cols: slice, g: Tensor, weight: Tensor) -> None:
    """target[samples, ..., cols] += g @ weight, g being 2-D rows of those samples' entries."""
    if samples is None:
        target.view(-1, target.shape[-1])[:, cols].addmm_(g, weight)
    else:
        target[samples, ..., cols] += (g @ weight).view(len(samples), *target.shape[1:-1], weight.shape[-1])


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
        tensors = [*kernel.parameters(), *kernel.buffers()]
        if any((t.device, t.dtype) != (base.weight.device, base.weight.dtype) for t in tensors):
            kernel = kernel.to(**factory)  # only when needed: fake parameters of an estimate cannot move
        self.kernel = kernel
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

    def fused(self, like: Tensor) -> bool:
        """Whether this layer runs the fused Triton ops (``snell.tuners.snell.fused``) for factors like
        ``like``: the
        piecewise-linear kernel with fixed coefficients, on the CUDA code path, where the ops run (CUDA
        with Triton, the fake tensors of a memory estimate, CPU tensors in Triton's interpreter)."""
        fixed_piecewise = isinstance(self.kernel, PiecewiseLinearKernel) and not self._kernel_names
        if not fixed_piecewise or device_type_of(like.device) != "cuda":
            return False
        return is_fake(like) or fused.available(like.device)

    def blocks(self, b: Tensor, gathered: bool = False) -> list[tuple[slice, slice, slice]]:
        """The blocks of dW this layer computes at a time (``weight_blocks``), for factors like ``b``: one
        for the fused ops, and for the backward on kept entries (``gathered``) while their gathered rows
        of A and B (r floats per kept entry) stay within ``GATHERED_WHOLE_FLOATS`` (a ViT's layers at
        r = 8; not a LLaMA-2-7B MLP matrix at r = 32, whose would take 1.7 GB)."""
        ratios = self.sparsity if isinstance(self.sparsity, tuple | list) else (self.sparsity,)
        gathered_floats = (1 - min(ratios)) * b.shape[0] * self.in_features * self.rank
        whole = self.fused(b) or (gathered and gathered_floats <= GATHERED_WHOLE_FLOATS)
        return weight_blocks(
            b.shape[0], self.in_features, self.groups, b.device,
            whole=whole, whole_columns=self.kernel.whole_columns,
        )  # fmt: skip

    def _fused_args(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The fused ops' (a, b, coef): a as (factor groups, in, r), b as (out, r)."""
        a3 = a.reshape(self.factor_groups, self.in_features, -1)
        return a3, b.reshape(-1, b.shape[-1]), self.kernel.coefficients

    def _fused_update(
        self, a: Tensor, b: Tensor, t: Tensor | None, add: Tensor | None, *, magnitude: bool = False
    ) -> Tensor:
        """S(dW) (+ ``add``), or |dW|, of the whole matrix from the fused op, dW computed on the fly."""
        rule = fused.RULE_IDS[self.rule]
        return fused.guarded(
            "update_kernel", fused.update, *self._fused_args(a, b), t, add, 1.0, rule, magnitude
        )

    def _fused_sparse_update(self, a: Tensor, b: Tensor, add: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """``sparse_update`` from the fused ops: |dW| for the threshold, freed before S is written."""
        t = None
        if self.sparsity != 0:
            magnitude = self._fused_update(a, b, None, None, magnitude=True)
            t = threshold(magnitude, self.sparsity, self.groups, magnitude=True, device_type="cuda")
            del magnitude
        return t, self._fused_update(a, b, t, add)

    @torch.no_grad()
    def sparse_update(
        self, a: Tensor, b: Tensor, kernel_params, add: Tensor | None = None, *, record_kept: bool = False
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """The thresholds t, S(dW) (+ ``add``, the frozen weight of the one-matmul form), a fresh out x in
        tensor: the forward pass's update; and with ``record_kept`` (for a backward that works on them,
        ``gathers``), the kept entries' sorted flat indices (int32; a tenth of dW's at s = 0.9), else None."""
        a, b = a.detach(), b.detach()  # views of a parameter made under no_grad would still require grad
        if self.fused(b):
            try:
                return *self._fused_sparse_update(a, b, add), None
            except fused.Fallback:  # the fused ops are off from now on (one warning): torch computes it
                pass
        dw = self.blockwise_update(a, b, kernel_params)
        t = threshold(dw, self.sparsity, self.groups, device_type=device_type_of(b.device))
        index = kept_mask(dw, t).view(-1).nonzero().squeeze(1).int() if record_kept else None
        update = apply_rule(dw, t, self.rule, inplace=True)
        return t, update if add is None else update.add_(add), index

    def update_vjp(
        self,
        a: Tensor,
        b: Tensor,
        kernel_params,
        t: Tensor | None,
        grad: WeightGrad,
        wants: tuple[bool, ...],
        *,
        add: Tensor | None = None,
        entries: Entries | None = None,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """S(dW) of one block (+ ``add``; a fresh tensor) and the gradients of a, b and the kernel's
        parameters that ``wants`` asks for, given the gradient reaching S (computed only where a gradient
        is wanted, and only at the kept entries where those suffice: ``samples_gradient``). From the
        kept ``entries`` alone where forward recorded them (``gathers``: nothing of the block's size but
        S), from the fused ops on the CUDA path, in closed form where the kernel has one (no autograd
        graph, a few block-sized temporaries), else by autograd through ``kernel_update``."""
        if entries is not None:
            return self._gathered_update_vjp(a, b, t, grad, entries, wants, add)
        if self.fused(b):
            try:
                return self._fused_update_vjp(a, b, t, grad, wants, add)
            except fused.Fallback:  # the fused ops are off from now on (one warning): torch computes it
                pass
        update, grads = self._update_vjp(a, b, kernel_params, t, grad, wants)
        return update if add is None else update.add_(add), grads

    def _fused_update_vjp(
        self,
        a: Tensor,
        b: Tensor,
        t: Tensor | None,
        grad: WeightGrad,
        wants: tuple[bool, ...],
        add: Tensor | None,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """``update_vjp`` from the fused ops (the kernel has no parameters: only a and b get gradients)."""
        found = [None, None]
        if any(wants):
            rule = fused.RULE_IDS[self.rule]
            args = (*self._fused_args(a, b), t, grad.dense(), rule)
            found = list(fused.guarded("vjp_kernel", fused.vjp, *args))
        update = self._fused_update(a, b, t, add)
        return update, [grad if want else None for grad, want in zip(found, wants[:2], strict=True)]

    def samples_gradient(self, like: Tensor, tokens: int) -> bool:
        """Whether backward computes the gradient reaching S only at the kept entries (``WeightGrad``): on
        the CPU path, where every group drops at least ``SAMPLED_MIN_SPARSITY`` (so there is a threshold)
        and the step has ``SAMPLED_MIN_TOKENS_PER_RANK`` tokens per rank."""
        if is_fake(like) or tokens < SAMPLED_MIN_TOKENS_PER_RANK * self.rank:
            return False
        ratios = self.sparsity if isinstance(self.sparsity, tuple | list) else (self.sparsity,)
        return device_type_of(like.device) == "cpu" and min(ratios) >= SAMPLED_MIN_SPARSITY

    def gathers(self, like: Tensor, tokens: int) -> bool:
        """Whether backward can work on the kept entries alone (``_gathered_update_vjp``), from their
        indices recorded by forward: where it samples the gradient and the kernel evaluates on gathered
        pairs of rows (``Kernel.pairs``; fixed parameters). Forward records them for float32/64 inputs
        outside autocast (under it, the dense backward serves; so it does for a memory estimate's fake
        tensors, which do not model the kept entries' indices: a CPU estimate of SNELL is a little off)."""
        return self.samples_gradient(like, tokens) and not self._kernel_names and self.kernel.has_pairs

    def _gathered_update_vjp(
        self, a: Tensor, b: Tensor, t: Tensor, grad: WeightGrad, entries: Entries, wants, add: Tensor | None
    ) -> tuple[Tensor, list[Tensor | None]]:
        """``update_vjp`` at the kept entries: the kernel on their gathered rows of a and b, the rule, the
        sampled gradient, and the factor gradients summed back by row (``index_add_``)."""
        rank = a.shape[-1]
        a_rows, b_rows = a.reshape(-1, rank), b.reshape(-1, rank)  # a block is (groups, rows, r)
        a_index = entries.rows.div(b.shape[-2], rounding_mode="floor") * a.shape[-2] + entries.cols
        dw, vjp = self.kernel.pairs(a_rows[a_index], b_rows[entries.rows])
        group = entries.rows.div(entries.shape[0] // t.numel(), rounding_mode="floor")
        values, factor = rule_at(dw, t[group], self.rule)
        if add is None:
            update = a.new_zeros(entries.shape)
        else:
            update = add.to(a.dtype, memory_format=torch.contiguous_format, copy=True)
        update.view(-1).index_add_(0, entries.flat(), values)
        if not any(wants):
            return update, []
        grad_a, grad_b = vjp(grad.at(entries).mul_(factor))
        found = [
            a_rows.new_zeros(a_rows.shape).index_add_(0, a_index, grad_a).view(a.shape) if wants[0] else None,
            b_rows.new_zeros(b_rows.shape).index_add_(0, entries.rows, grad_b).view(b.shape)
            if wants[1]
            else None,
        ]
        return update, found

    def _update_vjp(self, a, b, kernel_params, t, grad, wants) -> tuple[Tensor, list[Tensor | None]]:
        if not any(wants):
            with torch.no_grad():
                return apply_rule(self.kernel_update(a, b, kernel_params), t, self.rule).clone(), []
        with torch.no_grad():
            closed = self.kernel.closed_form(a, b)
        if closed is not None:
            with torch.no_grad():
                dw, vjp = closed
                block = dw.reshape(-1, a.shape[-2])
                sampled = self.samples_gradient(block, grad.tokens)
                reaching = grad.dense(kept_mask(block, t) if sampled else None)
                found = vjp(rule_vjp(dw, t, self.rule, reaching).view(dw.shape))
                update = apply_rule(dw.reshape(-1, a.shape[-2]), t, self.rule, inplace=True)
            grads = [*found[:2], *found[2]]
            return update, [grad if want else None for grad, want in zip(grads, wants, strict=True)]
        leaves = [f.detach().requires_grad_(w) for f, w in zip((a, b, *kernel_params), wants, strict=True)]
        with torch.enable_grad():
            update = apply_rule(self.kernel_update(leaves[0], leaves[1], leaves[2:]), t, self.rule)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad(update, wanted, grad.dense()))
        return update.detach(), [next(found) if leaf.requires_grad else None for leaf in leaves]

    @torch.no_grad()
    def blockwise_update(self, a: Tensor, b: Tensor, kernel_params) -> Tensor:
        """dW computed block by block exactly as backward recomputes it, so that both agree to the bit and
        keep the same entries (a block-shaped matmul may round differently from a full-size one).
        ``a`` and ``b`` are detached (``sparse_update``, its one caller, detaches them)."""
        blocks = self.blocks(b)
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
        dropout = self.training and not isinstance(self.dropout, nn.Identity)
        drop_path = self.training and not isinstance(self.drop_path, nn.Identity)
        if not self.recompute:  # plain autograd on W0 + S(dW): the ablation of the memory trick
            update = self.delta_weight()
            if not (dropout or drop_path):
                return F.linear(x, self.base.weight + update, self.base.bias)
            return self.base(x) + self.drop_path(F.linear(self.dropout(x), update))
        branch_x = self.dropout(x) if dropout else None  # the public code's order of random draws
        keep = self.drop_path.draw(x.shape[0]) if drop_path else None
        if keep is not None and branch_x is None and device_type_of(x.device) == "cuda":
            branch_x = x  # on a GPU a batch split costs more launches than the branch's FLOPs
        params = [p for _, p in self.kernel.named_parameters()]
        weight, bias = self.base.weight, self.base.bias
        return KernelSparseLinearFn.apply(
            x, branch_x, weight, bias, self.lora_A, self.lora_B, self, keep, *params
        )

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, kernel={self.kernel.name}, sparsity={self.sparsity}, "
            f"rule={self.rule}, groups={self.groups}, factor_groups={self.factor_groups}"
        )
