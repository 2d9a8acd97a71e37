"""SNELL against an independent implementation of the public code's layer math (ssfgunner/SNELL).

Written here from the published description, not from this project's layer: each adapter holds the
public code's factor tensors ``In_Qs`` (P, in, r/P) and ``Out_Qs`` (P, out, r/P); its update is
W = sum_p c_p cdist(In_Qs_p, Out_Qs_p) (in x out, c = +0.1, -0.1), sparsified for s > 0 by
``W * F.threshold(|W|, quantile(|W|, s), 0)`` and left as it is for s = 0 (the code's KLoRA); the branch
is ``F.linear(x, W.T)`` under activation checkpointing. q, k and v are three such adapters on one dropped
copy of the input, each with its own drop-path. Our layer gets the same factor values; outputs and all
gradients must agree within 1e-5 relative (float32).
"""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import drop_path
from torch import nn
from torch.utils.checkpoint import checkpoint

import snell
from snell.tuners.snell.kernels import build_kernel
from snell.tuners.snell.layer import SnellLinear
from tests.conftest import make_tiny_vit

RANK, PIECES, DIM = 8, 2, 48
RTOL = 1e-5


class PublicAdapter(nn.Module):
    """One adapter of the public code (its SNELL class for s > 0, KLoRA for s = 0)."""

    def __init__(self, in_qs: torch.Tensor, out_qs: torch.Tensor, sparsity: float) -> None:
        super().__init__()
        self.In_Qs, self.Out_Qs = nn.Parameter(in_qs), nn.Parameter(out_qs)
        self.coefficients = 0.1 * torch.tensor([(-1.0) ** p for p in range(PIECES)]).view(-1, 1, 1)
        self.sparsity = sparsity

    def weight(self) -> torch.Tensor:
        w = (self.coefficients * torch.cdist(self.In_Qs, self.Out_Qs)).sum(0)  # (in, out)
        if self.sparsity == 0:
            return w
        magnitude = w.detach().abs()
        t = torch.quantile(magnitude.flatten(), self.sparsity)
        return w * F.threshold(magnitude, float(t), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda inp: F.linear(inp, self.weight().T), x, use_reentrant=False)


def public_factor(stacked_rows: torch.Tensor) -> torch.Tensor:
    """Our (rows, r) factor as the public code's (P, rows, r/P) tensor (same values, r split in P)."""
    rows = stacked_rows.shape[0]
    return stacked_rows.detach().reshape(rows, PIECES, RANK // PIECES).permute(1, 0, 2).clone()


def our_grad(public_grad: torch.Tensor) -> torch.Tensor:
    """A gradient of a public (P, rows, r/P) factor in our (rows, r) layout."""
    return public_grad.permute(1, 0, 2).reshape(public_grad.shape[1], RANK)


def public_forward(layer, adapters, x, p_dropout, p_drop_path, training):
    """The public block's projection: W0 x + b + drop_path(adapter_k(dropout(x))) for each of q, k, v."""
    dropped = F.dropout(x, p_dropout, training)
    weights, biases = layer.base.weight.chunk(len(adapters)), layer.base.bias.chunk(len(adapters))
    outs = []
    for weight, bias, adapter in zip(weights, biases, adapters, strict=True):
        delta = drop_path(adapter(dropped), p_drop_path, training)
        outs.append(F.linear(x, weight, bias) + delta)
    return torch.cat(outs, -1)


def assert_relative_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("recompute", [True, False], ids=["fast", "recompute=False"])
@pytest.mark.parametrize(
    "p_dropout, p_drop_path",
    [(0.0, 0.0), (0.3, 0.3), (0.0, 0.3), (0.3, 0.0)],
    ids=["merged", "dropout+drop-path", "drop-path (merged, batch split)", "dropout"],
)
@pytest.mark.parametrize("groups", [3, 1], ids=["qkv", "fc"])
def test_layer_matches_the_public_codes_math(sparsity, recompute, p_dropout, p_drop_path, groups):
    torch.manual_seed(0)
    layer = SnellLinear(
        nn.Linear(DIM, groups * DIM),
        RANK,
        build_kernel("piecewise_linear", RANK),
        sparsity,
        groups=groups,
        dropout=p_dropout,
        drop_path=p_drop_path,
        recompute=recompute,
    )
    with torch.no_grad():  # trained-looking factors: larger than at init, so that S(dW) is not tiny
        layer.lora_A.normal_(0, 0.3), layer.lora_B.normal_(0, 0.3)
    a_sets = layer.lora_A.view(groups, DIM, RANK)
    b_sets = layer.lora_B.view(groups, DIM, RANK)
    adapters = [
        PublicAdapter(public_factor(a), public_factor(b), sparsity)
        for a, b in zip(a_sets, b_sets, strict=True)
    ]
    x = torch.randn(4, 5, DIM, generator=torch.Generator().manual_seed(1))
    x_ours, x_public = x.clone().requires_grad_(), x.clone().requires_grad_()

    layer.train()
    torch.manual_seed(2)  # the same dropout and drop-path draws, in the same order
    out = layer(x_ours)
    torch.manual_seed(2)
    expected = public_forward(layer, adapters, x_public, p_dropout, p_drop_path, training=True)
    assert_relative_close(out, expected)

    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    (expected * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    assert_relative_close(x_ours.grad, x_public.grad)
    for k, adapter in enumerate(adapters):
        assert_relative_close(layer.lora_A.grad.view(groups, DIM, RANK)[k], our_grad(adapter.In_Qs.grad))
        assert_relative_close(layer.lora_B.grad.view(groups, DIM, RANK)[k], our_grad(adapter.Out_Qs.grad))
    if sparsity == 0:
        assert all((adapter.weight() != 0).all() for adapter in adapters)  # no entry zeroed at s = 0


def test_linear_kernel_at_sparsity_zero_is_lora_with_the_same_factors(images):
    options = {"rank": 4, "dropout": 0.0, "qkv": "separate"}
    ours = make_tiny_vit(seed=0)
    snell.apply_method(
        ours, snell.method_config("snell", kernel="linear", sparsity=0.0, drop_path=0.0, **options)
    )
    lora = make_tiny_vit(seed=0)
    snell.apply_method(lora, snell.method_config("lora", alpha=4.0, **options))  # scaling alpha / r = 1
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        layers = {n: m for n, m in lora.named_modules() if isinstance(m, snell.AdaptedLinear)}
        for name, module in ours.named_modules():
            if isinstance(module, SnellLinear):
                groups = module.factor_groups
                a = module.lora_A.view(groups, module.in_features, 4).transpose(1, 2)  # (groups, r, in)
                layers[name].lora_A.copy_(a.reshape(groups * 4, module.in_features))
                layers[name].lora_B.copy_(module.lora_B)
        ours.head.load_state_dict(lora.head.state_dict())
        ours.cls_token.copy_(lora.cls_token)
    ours.eval(), lora.eval()
    assert_relative_close(ours(images), lora(images))


def test_attention_proj_branch_gets_no_dropout_as_in_the_public_code():
    model = make_tiny_vit()
    snell.apply_method(model, snell.method_config("snell", dropout=0.1))
    dropouts = {n: m.dropout for n, m in model.named_modules() if isinstance(m, SnellLinear)}
    assert all(isinstance(d, nn.Identity) == n.endswith("attn.proj") for n, d in dropouts.items())


class PublicLora(nn.Module):
    """The public code's LoRA adapter, ``TuningModule('lora')``: Linear(in, r) then Linear(r, out), no
    bias and no scaling, its output dropped per sample by DropPath (0.1 in the code)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, p_drop_path: float) -> None:
        super().__init__()
        self.learnable = nn.Sequential(
            nn.Linear(a.shape[1], a.shape[0], bias=False), nn.Linear(*b.shape[::-1], bias=False)
        )
        with torch.no_grad():
            self.learnable[0].weight.copy_(a)
            self.learnable[1].weight.copy_(b)
        self.p_drop_path = p_drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(self.learnable(x), self.p_drop_path, self.training)


@pytest.mark.parametrize("p_dropout, p_drop_path", [(0.1, 0.1), (0.0, 0.1), (0.3, 0.3)])
@pytest.mark.parametrize("groups", [3, 1], ids=["qkv", "fc"])
def test_lora_with_drop_path_matches_the_public_lora(p_dropout, p_drop_path, groups):
    from baselines.lora import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(
        nn.Linear(DIM, groups * DIM), RANK, float(RANK), p_dropout, groups, drop_path=p_drop_path
    )
    with torch.no_grad():  # trained-looking factors: B is zero at init, which would hide the drop-path
        layer.lora_A.normal_(0, 0.3), layer.lora_B.normal_(0, 0.3)
    adapters = [
        PublicLora(a, b, p_drop_path)
        for a, b in zip(layer.lora_A.detach().chunk(groups), layer.lora_B.detach().chunk(groups), strict=True)
    ]
    x = torch.randn(6, 5, DIM, generator=torch.Generator().manual_seed(1))
    x_ours, x_public = x.clone().requires_grad_(), x.clone().requires_grad_()

    layer.train()
    torch.manual_seed(2)  # the same dropout and drop-path draws, in the same order
    out = layer(x_ours)
    torch.manual_seed(2)
    expected = public_forward(layer, adapters, x_public, p_dropout, 0.0, training=True)  # drop-path inside
    assert_relative_close(out, expected)
    torch.manual_seed(3)
    without = public_forward(layer, adapters, x.clone(), 0.0, 0.0, training=True)
    assert not torch.allclose(out, without)  # some branch was dropped (and the rest rescaled)

    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    (expected * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    assert_relative_close(x_ours.grad, x_public.grad)
    for k, adapter in enumerate(adapters):
        assert_relative_close(layer.lora_A.grad.chunk(groups)[k], adapter.learnable[0].weight.grad)
        assert_relative_close(layer.lora_B.grad.chunk(groups)[k], adapter.learnable[1].weight.grad)

    layer.eval()
    for adapter in adapters:
        adapter.eval()
    assert_relative_close(
        layer(x), public_forward(layer, adapters, x, p_dropout, p_drop_path, training=False)
    )


def test_lora_drop_path_is_per_qkv_group_and_off_by_default():
    model = make_tiny_vit()
    snell.apply_method(model, snell.method_config("lora", drop_path=0.1))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, snell.AdaptedLinear)}
    assert all(
        m.drop_path.p == 0.1 and m.drop_path.groups == (3 if n.endswith("qkv") else 1)
        for n, m in layers.items()
    )
    shared = make_tiny_vit()
    snell.apply_method(shared, snell.method_config("lora", drop_path=0.1, qkv="shared_a"))
    qkv = [m for n, m in shared.named_modules() if n.endswith("attn.qkv")]
    assert qkv and all(m.groups == 1 and m.drop_path.groups == 3 for m in qkv)  # q, k, v dropped apart
    default = make_tiny_vit()
    snell.apply_method(default, snell.method_config("lora"))
    assert snell.method_config("lora").drop_path == 0.0
    assert all(
        isinstance(m.drop_path, nn.Identity) for m in default.modules() if isinstance(m, snell.AdaptedLinear)
    )
