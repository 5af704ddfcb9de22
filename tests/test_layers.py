"""RoCoFTLinear numerics against the dense reference W0 + R / W0 + C, gradients, merge, meta device."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from rocoft_pl.layers import RoCoFTLinear

OUT, IN = 7, 5


def make_base(kind: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    if kind == "conv1d":
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    return base.to(dtype)


def logical_weight(base: nn.Module) -> torch.Tensor:
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def layer_with_random_delta(kind, mode, idx, dtype=torch.float32):
    base = make_base(kind, dtype)
    layer = RoCoFTLinear(base, mode, torch.tensor(idx))
    with torch.no_grad():
        layer.delta.normal_()
    return layer


CASES = [("row", [1, 4, 6]), ("column", [0, 3]), ("entries", [0, 9, 17, 34])]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_forward_matches_dense_reference(kind, mode, idx, dtype, tol):
    layer = layer_with_random_delta(kind, mode, idx, dtype)
    x = torch.randn(3, 4, IN).to(dtype)
    dense = logical_weight(layer.base).float() + layer.delta_weight().float()
    expected = F.linear(x.float(), dense, layer.base.bias.float())
    torch.testing.assert_close(layer(x).float(), expected, rtol=tol, atol=tol)
    assert layer(x).dtype == dtype
    # The dense delta is non-zero exactly on the selected rows / columns / entries.
    nz = layer.delta_weight().ne(0)
    if mode == "row":
        assert nz.any(1).nonzero().flatten().tolist() == idx
    elif mode == "column":
        assert nz.any(0).nonzero().flatten().tolist() == idx
    else:
        assert nz.flatten().nonzero().flatten().tolist() == idx


# Few tokens (as in decoding) and many take different thin-product paths on CPU (layers._thin_product).
TOKENS = [6, 40]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_delta_gradient_equals_masked_full_weight_gradient(kind, mode, idx, tokens):
    layer = layer_with_random_delta(kind, mode, idx)
    layer.base.requires_grad_(False)
    x = torch.randn(tokens, IN)
    target = torch.randn(tokens, OUT)
    F.mse_loss(layer(x), target).backward()

    w = (logical_weight(layer.base) + layer.delta_weight()).detach().requires_grad_(True)
    F.mse_loss(F.linear(x, w, layer.base.bias), target).backward()
    full = w.grad
    if mode == "row":
        expected = full[idx]
    elif mode == "column":
        expected = full[:, idx]
    else:
        expected = full.flatten()[idx]
    torch.testing.assert_close(layer.delta.grad, expected)
    assert layer.base.weight.grad is None  # no full-size weight gradient


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES)
@pytest.mark.parametrize("train_bias", [False, True])
@pytest.mark.parametrize("tokens", TOKENS)
def test_input_and_bias_gradients_equal_the_dense_reference(kind, mode, idx, train_bias, tokens):
    """Also covers the fused row node (frozen W0, optionally a trained bias) on 3-d inputs."""
    layer = layer_with_random_delta(kind, mode, idx)
    layer.base.weight.requires_grad_(False)
    layer.base.bias.requires_grad_(train_bias)
    x = torch.randn(2, tokens // 2, IN, requires_grad=True)
    g = torch.randn(2, tokens // 2, OUT)
    layer(x).backward(g)

    w = (logical_weight(layer.base) + layer.delta_weight()).detach()
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = layer.base.bias.detach().clone().requires_grad_(True)
    F.linear(x_ref, w, b_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if train_bias:
        torch.testing.assert_close(layer.base.bias.grad, b_ref.grad)
    else:
        assert layer.base.bias.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES[:2])
def test_fused_delta_under_torch_func_per_example_gradients(kind, mode, idx):
    """torch.func (vmap over grad) through the fused row / column nodes gives each example's own delta gradient."""
    from torch.func import functional_call, grad, vmap

    layer = layer_with_random_delta(kind, mode, idx)
    layer.base.requires_grad_(False)
    xs, ts = torch.randn(4, IN), torch.randn(4, OUT)

    def loss(delta, x, t):
        return F.mse_loss(functional_call(layer, {"delta": delta}, (x[None],)), t[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(layer.delta.detach(), xs, ts)
    for i in range(4):
        layer.delta.grad = None
        loss(layer.delta, xs[i], ts[i]).backward()
        torch.testing.assert_close(per_example[i], layer.delta.grad)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES[:2])
@pytest.mark.parametrize("train_bias", [False, True])
def test_fused_nodes_under_autocast_match_autocasts_two_op_path(kind, mode, idx, train_bias):
    layer = layer_with_random_delta(kind, mode, idx)
    layer.base.weight.requires_grad_(False)
    layer.base.bias.requires_grad_(train_bias)
    x = torch.randn(2, 3, IN, requires_grad=True)
    g = torch.randn(2, 3, OUT)
    w = logical_weight(layer.base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        # autocast's own version: F.linear casts x, W0, b and D to bf16 and saves the casts
        ref = F.linear(x, w, layer.base.bias)
        if mode == "row":
            ref = ref.index_add(-1, layer.indices, F.linear(x, layer.delta))
        else:
            ref = ref + F.linear(x.index_select(-1, layer.indices), layer.delta)
    assert type(y.grad_fn).__name__.startswith("_RowDelta" if mode == "row" else "_ColumnDelta")
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(y, [x, layer.delta] + [layer.base.bias] * train_bias, g)
    refs = torch.autograd.grad(ref, [x, layer.delta] + [layer.base.bias] * train_bias, g)
    for got, want in zip(grads, refs):
        assert got.dtype == want.dtype == torch.float32  # back in the parameters' and input's dtype
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES[:2])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_forward_without_grad_mode_equals_the_autograd_node(kind, mode, idx, autocast):
    """no_grad / inference_mode run the node's forward as a plain function: same values, no graph."""
    layer = layer_with_random_delta(kind, mode, idx)
    layer.base.requires_grad_(False)
    x = torch.randn(2, 3, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with_graph = layer(x)
        with torch.no_grad():
            no_grad = layer(x)
        with torch.inference_mode():
            inference = layer(x)
    assert type(with_graph.grad_fn).__name__.startswith("_RowDelta" if mode == "row" else "_ColumnDelta")
    assert no_grad.grad_fn is None and inference.grad_fn is None
    assert torch.equal(no_grad, with_graph.detach()) and torch.equal(inference, with_graph.detach())
    assert no_grad.dtype == (torch.bfloat16 if autocast else torch.float32)


@pytest.mark.parametrize("mode", ["row", "column"])
def test_under_autocast_no_low_precision_copy_of_w0_is_kept_for_backward(mode):
    layer = layer_with_random_delta("linear", mode, [2, 3])
    layer.base.requires_grad_(False)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer(torch.randn(4, IN))
    weights = [t for t in saved if t.numel() == OUT * IN]
    assert weights and all(t.dtype == torch.float32 for t in weights)  # only the resident fp32 W0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast's plain F.linear keeps: a bf16 copy
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            F.linear(torch.randn(4, IN, requires_grad=True), layer.base.weight)
    assert any(t.numel() == OUT * IN and t.dtype == torch.bfloat16 for t in saved)


@pytest.mark.parametrize("mode", ["row", "column"])
def test_no_full_size_weight_saved_or_materialised(mode):
    """Row/column backward keeps no (out x in) tensor except the frozen W0 itself."""
    layer = layer_with_random_delta("linear", mode, [2, 3])
    layer.base.requires_grad_(False)
    x = torch.randn(4, IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    w_ptr = layer.base.weight.untyped_storage().data_ptr()
    full_size = [t for t in saved if t.shape == (OUT, IN) and t.untyped_storage().data_ptr() != w_ptr]
    assert full_size == []
    y.sum().backward()
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES)
def test_adamw_with_weight_decay_changes_only_selected_weights(kind, mode, idx):
    layer = RoCoFTLinear(make_base(kind), mode, torch.tensor(idx))
    layer.base.requires_grad_(False)
    w0 = logical_weight(layer.base).detach().clone()
    opt = torch.optim.AdamW([layer.delta], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, IN)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(logical_weight(layer.base), w0)  # W0 untouched during training
    merged = logical_weight(layer.merge()).detach().contiguous()
    changed = merged.ne(w0)
    selected = torch.zeros_like(changed)
    if mode == "row":
        selected[idx] = True
    elif mode == "column":
        selected[:, idx] = True
    else:
        selected.view(-1)[idx] = True
    assert changed[selected].all()
    assert torch.equal(merged[~selected], w0[~selected])  # bit-identical elsewhere


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES)
def test_merge_matches_unmerged_output(kind, mode, idx):
    layer = layer_with_random_delta(kind, mode, idx)
    x = torch.randn(2, 3, IN)
    before = layer(x)
    base = layer.merge()
    assert type(base) in (nn.Linear, Conv1D)
    torch.testing.assert_close(base(x), before)
    torch.testing.assert_close(layer(x), before)  # a merged wrapper no longer adds the delta twice


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", CASES)
def test_unmerge_restores_w0_bit_exactly_in_bf16(kind, mode, idx):
    layer = layer_with_random_delta(kind, mode, idx, torch.bfloat16)
    w0 = layer.base.weight.clone()
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16)
    before = layer(x)
    layer.merge()
    assert not torch.equal(layer.base.weight, w0)
    assert layer.unmerge() is layer and not layer.merged
    assert torch.equal(layer.base.weight, w0)  # W0 + D - D would not be exact in bf16
    assert torch.equal(layer(x), before)
    layer.unmerge()  # a no-op when not merged
    assert torch.equal(layer.base.weight, w0)


def test_meta_device_init_then_materialise_restores_indices():
    with torch.device("meta"):
        base = nn.Linear(IN, OUT)
    layer = RoCoFTLinear(base, "row", torch.tensor([0, 5]))
    assert layer.delta.is_meta and layer.indices.is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    base.reset_parameters()
    assert layer.indices.tolist() == [0, 5]
    assert torch.equal(layer.delta, torch.zeros(2, IN))


def test_indices_buffer_is_persistent_and_restored_by_state_dict():
    a = layer_with_random_delta("linear", "column", [1, 2])
    b = RoCoFTLinear(make_base("linear"), "column", torch.tensor([0, 4]))
    b.load_state_dict(a.state_dict())
    assert b.indices.tolist() == [1, 2]
    x = torch.randn(3, IN)
    torch.testing.assert_close(b(x), a(x))


@pytest.mark.parametrize(
    "mode,idx,match",
    [("row", [7], "out of range"), ("column", [5], "out of range"), ("row", [1, 1], "unique"), ("diag", [0], "mode")],
)
def test_bad_indices_are_rejected(mode, idx, match):
    with pytest.raises(ValueError, match=match):
        RoCoFTLinear(make_base("linear"), mode, torch.tensor(idx))


def test_rejects_unsupported_module():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        RoCoFTLinear(nn.Conv2d(1, 1, 1), "row", torch.tensor([0]))
