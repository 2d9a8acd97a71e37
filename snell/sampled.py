"""A sampled matrix product: (left @ right) at chosen entries only, for the update's gradient g^T x on a
CPU, which SNELL's rules need only at the kept entries of dW (a tenth of them at s = 0.9).

``torch.sparse.sampled_addmm`` does the work. It runs inside a custom op (``snell::sampled_mm``) that
takes and returns dense tensors, so that tensor-level tools (MemTracker, fake-tensor estimates) see
dense inputs and outputs and never the sparse CSR tensors they cannot handle; the op's inner temporaries
(a CSR pattern of the kept entries' values) are not tracked.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


@torch.library.custom_op("snell::sampled_mm", mutates_args=())
def sampled_mm(crow: Tensor, col: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """(left @ right)[j, col[n]] for the entries n of row j, crow[j] <= n < crow[j + 1] (CSR order):
    (nnz,) values, for left (m, k) and right (k, n) in float32 or float64."""
    shape = (left.shape[0], right.shape[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        zeros = torch.sparse_csr_tensor(crow, col, left.new_zeros(col.shape), shape, check_invariants=False)
        return torch.sparse.sampled_addmm(zeros, left, right, beta=0.0).values()


@sampled_mm.register_fake
def _(crow, col, left, right):
    return left.new_empty(col.shape)


def masked_product(kept: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """left @ right at the ``kept`` (bool) entries, zeros elsewhere: a dense result whose cost scales with
    the kept entries, not with the whole matrix."""
    col = kept.nonzero()[:, 1]
    crow = torch.zeros(kept.shape[0] + 1, dtype=col.dtype, device=kept.device)
    torch.cumsum(kept.sum(1), 0, out=crow[1:])
    values = sampled_mm(crow, col, left, right)
    return left.new_zeros(kept.shape).masked_scatter_(kept, values)
