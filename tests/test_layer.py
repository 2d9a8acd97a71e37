"""The SNELL layer: equivalence with plain autograd, what backward keeps, groups, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snell
from snell.tuners.snell.kernels import build_kernel
from snell.tuners.snell.layer import SnellLinear, code_path, weight_blocks


def make_layer(kernel="piecewise_linear", sparsity=0.9, rule="public", groups=1, **kw) -> SnellLinear:
    torch.manual_seed(0)
    base = nn.Linear(48, 96)
    return SnellLinear(base, 8, build_kernel(kernel, 8, **kw), sparsity, rule, groups)


def reference_forward(layer: SnellLinear, x):
    """The naive form: materialise S(dW) with plain autograd and add it to W0."""
    return F.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias)


@pytest.mark.parametrize("kernel", snell.list_kernels())
@pytest.mark.parametrize("rule", ["public", "eq5", "hard"])
def test_custom_function_matches_plain_autograd(kernel, rule):
    layer = make_layer(kernel, rule=rule, groups=3)
    x = torch.randn(3, 5, 48, requires_grad=True)
    params = [x, *[p for p in layer.parameters() if p.requires_grad]]

    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref = reference_forward(layer, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def saved_tensor_shapes(module: nn.Module, x: torch.Tensor) -> list[tuple[tuple[int, ...], int]]:
    """(shape, data_ptr) of every tensor autograd keeps for backward during one forward."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return saved


def test_snell_saves_no_full_size_update():
    layer = make_layer()
    layer.train()
    x = torch.randn(4, 48, requires_grad=True)
    weight_ptr = layer.base.weight.untyped_storage().data_ptr()
    saved = saved_tensor_shapes(layer, x)
    full_size = [(shape, ptr) for shape, ptr in saved if shape == (96, 48)]
    # The only out x in tensor kept is the frozen base weight itself (a parameter, not a new allocation).
    assert all(ptr == weight_ptr for _, ptr in full_size), full_size
    print("SNELL saves:", [shape for shape, _ in saved])


def test_lora_saves_only_small_tensors_for_comparison():
    from baselines.lora import LoraLinear

    layer = LoraLinear(nn.Linear(48, 96), 8, 8.0, 0.0)
    saved = saved_tensor_shapes(layer, torch.randn(4, 48, requires_grad=True))
    print("LoRA saves:", [shape for shape, _ in saved])
    assert all(
        shape != (96, 48) or ptr == layer.base.weight.untyped_storage().data_ptr() for shape, ptr in saved
    )


def test_whole_model_saves_no_update_matrix(tiny_vit, images):
    snell.apply_method(tiny_vit, snell.method_config("snell", rank=4, dropout=0.0, drop_path=0.0))
    weights = {
        m.base.weight.untyped_storage().data_ptr()
        for m in tiny_vit.modules()
        if isinstance(m, snell.AdaptedLinear)
    }
    shapes = {tuple(m.base.weight.shape) for m in tiny_vit.modules() if isinstance(m, snell.AdaptedLinear)}
    offenders = [(s, p) for s, p in saved_tensor_shapes(tiny_vit, images) if s in shapes and p not in weights]
    assert not offenders


def test_dropout_branch_path_matches_reference_in_eval_and_trains():
    torch.manual_seed(0)
    layer = SnellLinear(
        nn.Linear(48, 96), 8, build_kernel("piecewise_linear", 8), 0.5, dropout=0.1, drop_path=0.1
    )
    x = torch.randn(6, 48)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-6)
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_trainable_kernel_parameters_get_gradients():
    layer = make_layer("piecewise_linear", learnable=True)
    layer(torch.randn(4, 48)).pow(2).sum().backward()
    assert layer.kernel.coefficients.grad is not None
    assert layer.kernel.coefficients.grad.abs().sum() > 0


def test_bfloat16_autocast_runs():
    layer = make_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 48))
    out.float().sum().backward()
    assert torch.isfinite(layer.lora_A.grad).all()


def test_recompute_off_matches_and_keeps_the_update_alive():
    layer = make_layer(groups=3)
    layer.recompute = False
    x = torch.randn(4, 48, requires_grad=True)
    torch.testing.assert_close(layer(x), reference_forward(layer, x))
    weight_ptr = layer.base.weight.untyped_storage().data_ptr()
    full_size = [s for s, p in saved_tensor_shapes(layer, x) if math.prod(s) >= 96 * 48 and p != weight_ptr]
    assert full_size  # dW and its intermediates stay alive for backward


@pytest.mark.parametrize("method", ["snell", "lora"])
def test_branch_dropout_keeps_a_one_byte_mask(method):
    """Branch dropout keeps a bool mask and one float copy of the input, as CUDA's fused dropout does
    (nn.Dropout on a CPU would keep a float noise tensor instead: 4 bytes per element, not 1)."""
    model = nn.Sequential(nn.Linear(48, 48))
    config = snell.method_config(method, rank=8, dropout=0.1, targets=("0",), train_head=False)
    snell.apply_method(model, config)
    model.train()
    x = torch.randn(6, 48, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        model(x).sum()
    input_sized = sorted(str(t.dtype) for t in kept if t.shape == x.shape)
    assert input_sized == ["torch.bool", "torch.float32"]


def test_code_path_uses_another_device_types_block_size():
    cpu = torch.device("cpu")
    shape = (1280, 5120)  # ViT-H fc1: 6.5M entries, about 12 CPU blocks (2**19) or 7 CUDA blocks (2**20)
    on_cpu = weight_blocks(*shape, 1, cpu)
    with code_path("cuda"):
        as_cuda = weight_blocks(*shape, 1, cpu)
    assert len(on_cpu) >= 12 and len(as_cuda) == 7
    assert weight_blocks(*shape, 1, cpu) == on_cpu  # restored on exit


@pytest.mark.parametrize("kernel", snell.list_kernels())
@pytest.mark.parametrize("rule", ["public", "eq5", "hard"])
@pytest.mark.parametrize("groups", [1, 3])
def test_sparsity_zero_merges_the_kernels_dw_itself(kernel, rule, groups):
    layer = make_layer(kernel, sparsity=0.0, rule=rule, groups=groups)
    a = layer.lora_A.view(groups, 48, 8)
    b = layer.lora_B.view(groups, -1, 8)
    dw = torch.cat([layer.kernel(a[k], b[k]) for k in range(groups)])  # q, k, v blocks one by one
    exact = not layer.kernel.whole_columns  # a softmax over all groups at once rounds a little apart
    torch.testing.assert_close(layer.delta_weight(), dw, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-8)
    merged = layer.merged()
    assert torch.equal(merged.weight, layer.base.weight + layer.delta_weight())
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + dw, layer.base.bias))
