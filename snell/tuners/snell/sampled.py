"""Sampled products for SNELL's CPU backward: the update's gradient g^T x at the kept entries of dW only
(every sparsification rule passes no gradient to the others; a tenth of the entries at s = 0.9).

``torch.sparse.sampled_addmm`` does the work. It runs inside a custom op (``snell::sampled_mm``) that
takes and returns dense tensors, so that tensor-level tools (MemTracker, fake-tensor estimates) see
dense inputs and outputs and never the sparse CSR tensors they cannot handle; the op's inner temporary
(a CSR tensor of the kept entries' values) is not tracked. ``Entries`` are the kept entries of one block
of dW, in row-major (CSR) order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@torch.library.custom_op("snell::sampled_mm", mutates_args=())
def sampled_mm(crow: Tensor, col: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """(left @ right)[j, col[n]] for the entries n of row j, crow[j] <= n < crow[j + 1] (CSR order):
    (nnz,) values, for left (m, k) and right (k, n) in float32 or float64. Fastest with the k dimension
    contiguous in both (left contiguous, right the transpose of a contiguous tensor): else it copies."""
    shape = (left.shape[0], right.shape[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        zeros = torch.sparse_csr_tensor(crow, col, left.new_zeros(col.shape), shape, check_invariants=False)
        return torch.sparse.sampled_addmm(zeros, left, right, beta=0.0).values()


@sampled_mm.register_fake
def _(crow, col, left, right):
    return left.new_empty(col.shape)


@dataclass(frozen=True)
class Entries:
    """Entries of a (rows x cols) block in row-major order: local row and column indices (int64) and
    the CSR row pointers (``crow[j]`` = the first entry of row j)."""

    rows: Tensor
    cols: Tensor
    crow: Tensor
    shape: tuple[int, int]

    @classmethod
    def from_mask(cls, kept: Tensor) -> Entries:
        """The True entries of a bool block."""
        rows, cols = kept.nonzero().unbind(1)
        return cls._with_rows(rows, cols, tuple(kept.shape))

    @classmethod
    def from_index(
        cls, index: Tensor, in_features: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> Entries:
        """The entries of block [rows) x [cols) among ``index``: the sorted flat indices (j * in + i) of a
        whole matrix's entries."""
        bounds = torch.tensor([rows[0] * in_features, rows[1] * in_features], dtype=index.dtype)
        start, stop = torch.searchsorted(index, bounds).tolist()
        flat = index[start:stop].long()
        found_rows, found_cols = flat.div(in_features, rounding_mode="floor") - rows[0], flat % in_features
        if cols != (0, in_features):
            inside = (found_cols >= cols[0]) & (found_cols < cols[1])
            found_rows, found_cols = found_rows[inside], found_cols[inside] - cols[0]
        return cls._with_rows(found_rows, found_cols, (rows[1] - rows[0], cols[1] - cols[0]))

    @classmethod
    def _with_rows(cls, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> Entries:
        crow = rows.new_zeros(shape[0] + 1)
        torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0, out=crow[1:])
        return cls(rows, cols, crow, shape)

    def flat(self) -> Tensor:
        """The entries' positions in the flattened block."""
        return self.rows * self.shape[1] + self.cols

    def product(self, left: Tensor, right: Tensor, rows: slice | None = None) -> Tensor:
        """(left @ right) at the entries of block rows ``rows`` (all: None), left holding those rows."""
        lo, hi = (0, self.shape[0]) if rows is None else (rows.start, rows.stop)
        start, stop = int(self.crow[lo]), int(self.crow[hi])
        return sampled_mm(self.crow[lo : hi + 1] - start, self.cols[start:stop], left, right)


def masked_product(kept: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """left @ right at the ``kept`` (bool) entries, zeros elsewhere: a dense result whose cost scales with
    the kept entries, not with the whole matrix."""
    values = Entries.from_mask(kept).product(left, right)
    return left.new_zeros(kept.shape).masked_scatter_(kept, values)
