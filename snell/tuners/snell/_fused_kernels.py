"""Triton kernels of ``snell.tuners.snell.fused`` (imported only when they run: Triton is optional).

Distances use ``tl.sqrt_rn`` (correctly rounded, as torch's sqrt; ``tl.sqrt`` is approximate on GPUs).
The loops over a piece's r / P columns are loops of the compiled code (``range``), not unrolled by Triton
(``tl.static_range``): the same operations in the same order, and the vjp kernel at r = 32 compiles in
about 1 s instead of 20 (``bench/perf/fused_compile.py`` compiles every launch in the tests).

Every kernel computes dW of its tile from the factors with ``_dw_tile`` (one shared function, so |dW|
for the threshold, the merged weight and the gradient agree to the bit); none reads or writes a dW.
Layout: a (F, in, R) contiguous, b (out, R); row j of dW uses factor group j // rows_per_factor and
threshold group j // rows_per_group; a tile's rows lie in one of each (the wrapper picks BJ so).
"""

import triton
import triton.language as tl


@triton.jit
def _pieces_sq(a_ptr, b_ptr, offs_j, offs_i, mask_j, mask_i, p, R: tl.constexpr, WIDTH: tl.constexpr):
    """sum_k (a[i, k] - b[j, k])^2 over the k of piece p: (BJ, BI)."""
    sq = tl.zeros((offs_j.shape[0], offs_i.shape[0]), dtype=tl.float32)
    for k in range(WIDTH):
        col = p * WIDTH + k
        av = tl.load(a_ptr + offs_i * R + col, mask=mask_i, other=0.0)
        bv = tl.load(b_ptr + offs_j * R + col, mask=mask_j, other=0.0)
        d = av[None, :] - bv[:, None]
        sq += d * d
    return sq


@triton.jit
def _dw_tile(a_ptr, b_ptr, coef_ptr, offs_j, offs_i, mask_j, mask_i, R: tl.constexpr, P: tl.constexpr):
    """dW = sum_p c_p ||a_p[i] - b_p[j]|| of one tile, the distances computed directly."""
    dw = tl.zeros((offs_j.shape[0], offs_i.shape[0]), dtype=tl.float32)
    for p in tl.static_range(P):
        dist = tl.sqrt_rn(_pieces_sq(a_ptr, b_ptr, offs_j, offs_i, mask_j, mask_i, p, R, R // P))
        dw += tl.load(coef_ptr + p) * dist
    return dw


@triton.jit
def _tile(pid_j, pid_i, a_ptr, out_features, in_features, rows_per_factor, R: tl.constexpr, BJ, BI):
    """Offsets and masks of a tile, and the factor group's A."""
    offs_j = pid_j * BJ + tl.arange(0, BJ)
    offs_i = pid_i * BI + tl.arange(0, BI)
    factor = (pid_j * BJ) // rows_per_factor
    return offs_j, offs_i, offs_j < out_features, offs_i < in_features, a_ptr + factor * in_features * R


@triton.jit
def update_kernel(
    a_ptr, b_ptr, coef_ptr, t_ptr, w_ptr, out_ptr,
    out_features, in_features, rows_per_factor, rows_per_group, scale,
    R: tl.constexpr, P: tl.constexpr, RULE: tl.constexpr, HAS_T: tl.constexpr, HAS_W: tl.constexpr,
    MAGNITUDE: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """out = |dW| (MAGNITUDE), or (W +) scale * S(dW) with the rule's threshold per group."""
    pid_j, pid_i = tl.program_id(0), tl.program_id(1)
    offs_j, offs_i, mask_j, mask_i, a_f = _tile(
        pid_j, pid_i, a_ptr, out_features, in_features, rows_per_factor, R, BJ, BI
    )
    dw = _dw_tile(a_f, b_ptr, coef_ptr, offs_j, offs_i, mask_j, mask_i, R, P)
    mask = mask_j[:, None] & mask_i[None, :]
    where = offs_j[:, None] * in_features + offs_i[None, :]
    if MAGNITUDE:
        result = tl.abs(dw)
    else:
        result = dw
        if HAS_T:
            t = tl.load(t_ptr + (pid_j * BJ) // rows_per_group)
            magnitude = tl.abs(dw)
            if RULE == 0:
                result = tl.where(magnitude > t, dw * magnitude, 0.0)
            elif RULE == 1:
                result = dw * tl.maximum(magnitude - t, 0.0)
            else:
                result = tl.where(magnitude > t, dw, 0.0)
        result = result * scale
        if HAS_W:
            result = result + tl.load(w_ptr + where, mask=mask, other=0.0)
    tl.store(out_ptr + where, result, mask=mask)


@triton.jit
def vjp_kernel(
    a_ptr, b_ptr, coef_ptr, t_ptr, g_ptr, part_a_ptr, part_b_ptr,
    out_features, in_features, rows_per_factor, rows_per_group, a_rows,
    R: tl.constexpr, P: tl.constexpr, RULE: tl.constexpr, HAS_T: tl.constexpr,
    BJ: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """Per-tile partial gradients of a and b from the gradient g reaching S: part_a[pid_j] holds the
    tile's sum over its rows for each column i, part_b[pid_i] its sum over its columns for each row j."""
    pid_j, pid_i = tl.program_id(0), tl.program_id(1)
    offs_j, offs_i, mask_j, mask_i, a_f = _tile(
        pid_j, pid_i, a_ptr, out_features, in_features, rows_per_factor, R, BJ, BI
    )
    dw = _dw_tile(a_f, b_ptr, coef_ptr, offs_j, offs_i, mask_j, mask_i, R, P)
    mask = mask_j[:, None] & mask_i[None, :]
    grad = tl.load(g_ptr + offs_j[:, None] * in_features + offs_i[None, :], mask=mask, other=0.0)
    if HAS_T:
        t = tl.load(t_ptr + (pid_j * BJ) // rows_per_group)
        magnitude = tl.abs(dw)
        kept = magnitude > t
        if RULE == 0:
            grad = tl.where(kept, grad * magnitude, 0.0)
        elif RULE == 1:
            grad = grad * (tl.maximum(magnitude - t, 0.0) + tl.where(kept, magnitude, 0.0))
        else:
            grad = tl.where(kept, grad, 0.0)
    factor_row = ((pid_j * BJ) // rows_per_factor) * in_features
    WIDTH: tl.constexpr = R // P
    for p in tl.static_range(P):
        dist = tl.sqrt_rn(_pieces_sq(a_f, b_ptr, offs_j, offs_i, mask_j, mask_i, p, R, WIDTH))
        h = tl.where(dist > 0, tl.load(coef_ptr + p) * grad / dist, 0.0)
        for k in range(WIDTH):
            col = p * WIDTH + k
            av = tl.load(a_f + offs_i * R + col, mask=mask_i, other=0.0)
            bv = tl.load(b_ptr + offs_j * R + col, mask=mask_j, other=0.0)
            hd = h * (av[None, :] - bv[:, None])
            tl.store(
                part_a_ptr + (pid_j * a_rows + factor_row + offs_i) * R + col, tl.sum(hd, axis=0), mask=mask_i
            )
            tl.store(part_b_ptr + (pid_i * out_features + offs_j) * R + col, -tl.sum(hd, axis=1), mask=mask_j)
