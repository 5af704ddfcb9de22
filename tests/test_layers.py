"""RoCoFTLinear numerics against the dense reference W0 + R / W0 + C / W0 + R + C, gradients, merge, meta device."""

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


def make_layer(base, mode, idx):
    """Mode 'both' takes idx as (rows, columns)."""
    if mode == "both":
        return RoCoFTLinear(base, mode, torch.tensor(idx[0]), torch.tensor(idx[1]))
    return RoCoFTLinear(base, mode, torch.tensor(idx))


def layer_with_random_delta(kind, mode, idx, dtype=torch.float32):
    base = make_base(kind, dtype)
    layer = make_layer(base, mode, idx)
    with torch.no_grad():
        for delta in layer.deltas.values():  # in mode 'both' also the overlap block of the column delta
            delta.normal_()
    return layer


def selected_mask(mode, idx):
    """Which entries of the (out x in) weight the deltas update."""
    mask = torch.zeros(OUT, IN, dtype=torch.bool)
    if mode == "row":
        mask[idx] = True
    elif mode == "column":
        mask[:, idx] = True
    elif mode == "both":
        mask[idx[0]] = True
        mask[:, idx[1]] = True
    else:
        mask.view(-1)[idx] = True
    return mask


def two_idx(mode):
    return ([2, 3], [1, 4]) if mode == "both" else [2, 3]


CASES = [("row", [1, 4, 6]), ("column", [0, 3]), ("entries", [0, 9, 17, 34])]
# Rows and columns overlapping in a 3 x 3 block (the column delta's entries there are inert).
BOTH = ("both", ([1, 4, 6], [0, 3, 4]))
ALL = CASES + [BOTH]
FUSED = CASES[:2] + [BOTH]
NODES = {"row": "_RowDelta", "column": "_ColumnDelta", "both": "_RowColumnDelta"}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", ALL)
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
    elif mode == "both":
        assert torch.equal(nz, selected_mask(mode, idx))
        # the overlap holds the row delta's values: the column delta's (random) entries there are not read
        rows, cols = torch.tensor(idx[0]), torch.tensor(idx[1])
        assert torch.equal(layer.delta_weight()[rows][:, cols], layer.delta.detach()[:, cols])
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
@pytest.mark.parametrize("mode,idx", ALL)
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
@pytest.mark.parametrize("mode,idx", FUSED)
def test_fused_delta_under_torch_func_per_example_gradients(kind, mode, idx):
    """torch.func (vmap over grad) through the fused row / column nodes gives each example's own delta gradient."""
    from torch.func import functional_call, grad, vmap

    layer = layer_with_random_delta(kind, mode, idx)
    layer.base.requires_grad_(False)
    xs, ts = torch.randn(4, IN), torch.randn(4, OUT)

    def loss(delta, x, t):
        return F.mse_loss(functional_call(layer, {"adapters.default.delta": delta}, (x[None],)), t[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(layer.delta.detach(), xs, ts)
    for i in range(4):
        layer.delta.grad = None
        loss(layer.delta, xs[i], ts[i]).backward()
        torch.testing.assert_close(per_example[i], layer.delta.grad)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", FUSED)
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
        elif mode == "column":
            ref = ref + F.linear(x.index_select(-1, layer.indices), layer.delta)
        else:
            ref = ref.index_add(-1, layer.indices, F.linear(x, layer.delta))
            ref = ref + F.linear(x.index_select(-1, layer.column_indices), layer._column_delta())
    assert type(y.grad_fn).__name__.startswith(NODES[mode])
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    wrt = [x, *layer.deltas.values()] + [layer.base.bias] * train_bias
    grads = torch.autograd.grad(y, wrt, g)
    refs = torch.autograd.grad(ref, wrt, g)
    for got, want in zip(grads, refs):
        assert got.dtype == want.dtype == torch.float32  # back in the parameters' and input's dtype
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", FUSED)
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
    assert type(with_graph.grad_fn).__name__.startswith(NODES[mode])
    assert no_grad.grad_fn is None and inference.grad_fn is None
    assert torch.equal(no_grad, with_graph.detach()) and torch.equal(inference, with_graph.detach())
    assert no_grad.dtype == (torch.bfloat16 if autocast else torch.float32)


@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_under_autocast_no_low_precision_copy_of_w0_is_kept_for_backward(mode):
    layer = layer_with_random_delta("linear", mode, two_idx(mode))
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


@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_no_full_size_weight_saved_or_materialised(mode):
    """Row/column/both backward keeps no (out x in) tensor except the frozen W0 itself."""
    layer = layer_with_random_delta("linear", mode, two_idx(mode))
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
@pytest.mark.parametrize("mode,idx", ALL)
def test_adamw_with_weight_decay_changes_only_selected_weights(kind, mode, idx):
    layer = make_layer(make_base(kind), mode, idx)
    layer.base.requires_grad_(False)
    w0 = logical_weight(layer.base).detach().clone()
    opt = torch.optim.AdamW(layer.deltas.values(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, IN)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(logical_weight(layer.base), w0)  # W0 untouched during training
    merged = logical_weight(layer.merge()).detach().contiguous()
    changed = merged.ne(w0)
    selected = selected_mask(mode, idx)
    assert changed[selected].all()
    assert torch.equal(merged[~selected], w0[~selected])  # bit-identical elsewhere


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", ALL)
def test_merge_matches_unmerged_output(kind, mode, idx):
    layer = layer_with_random_delta(kind, mode, idx)
    x = torch.randn(2, 3, IN)
    before = layer(x)
    base = layer.merge()
    assert type(base) in (nn.Linear, Conv1D)
    torch.testing.assert_close(base(x), before)
    torch.testing.assert_close(layer(x), before)  # a merged wrapper no longer adds the delta twice


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode,idx", ALL)
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
    [
        ("row", [7], "out of range"), ("column", [5], "out of range"), ("row", [1, 1], "unique"), ("diag", [0], "mode"),
        ("both", ([7], [0]), r"row indices out of range \[0, 7\)"), ("both", ([0], [5]), r"column indices out of range \[0, 5\)"),
        ("both", ([0, 1], [2, 2]), "column indices must be unique"), ("both", ([0], []), "at least one index"),
    ],
)
def test_bad_indices_are_rejected(mode, idx, match):
    with pytest.raises(ValueError, match=match):
        make_layer(make_base("linear"), mode, idx)


def test_column_indices_go_with_mode_both_only():
    with pytest.raises(ValueError, match="mode 'both' needs them"):
        RoCoFTLinear(make_base("linear"), "both", torch.tensor([0]))
    with pytest.raises(ValueError, match="column_indices go with mode 'both' only"):
        RoCoFTLinear(make_base("linear"), "row", torch.tensor([0]), torch.tensor([1]))


def test_rejects_unsupported_module():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        RoCoFTLinear(nn.Conv2d(1, 1, 1), "row", torch.tensor([0]))


# -- mode 'both': r rows and r columns --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(6,), (40,), (2, 3), (4, 10)], ids=["2d-6", "2d-40", "3d-6", "3d-40"])
@pytest.mark.parametrize("train_bias", [False, True])
def test_both_gradients_are_the_dense_gradient_on_rows_union_columns(kind, shape, train_bias):
    """Each entry of rows u columns gets dL/dW once: the overlap through the row delta, the column delta's
    overlap block gets zero; nothing outside the union; no full-size weight gradient."""
    rows, cols = [1, 4, 6], [0, 3, 4]
    layer = layer_with_random_delta(kind, "both", (rows, cols))
    layer.base.weight.requires_grad_(False)
    layer.base.bias.requires_grad_(train_bias)
    x = torch.randn(*shape, IN, requires_grad=True)
    target = torch.randn(*shape, OUT)
    F.mse_loss(layer(x), target).backward()

    w = (logical_weight(layer.base) + layer.delta_weight()).detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = layer.base.bias.detach().clone().requires_grad_(True)
    F.mse_loss(F.linear(x_ref, w, b_ref), target).backward()
    assert torch.equal(layer.delta_columns.grad[rows], torch.zeros(3, 3))
    union = torch.zeros(OUT, IN)
    union[:, cols] = layer.delta_columns.grad
    union[rows] = layer.delta.grad
    torch.testing.assert_close(union, w.grad * selected_mask("both", (rows, cols)))
    torch.testing.assert_close(layer.delta.grad, w.grad[rows])
    torch.testing.assert_close(x.grad, x_ref.grad)
    if train_bias:
        torch.testing.assert_close(layer.base.bias.grad, b_ref.grad)
    else:
        assert layer.base.bias.grad is None
    assert layer.base.weight.grad is None
    assert layer.delta_columns.grad.stride() == layer.delta_columns.stride()  # stored as the (r x out) block


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_both_unfused_path_gives_the_fused_values_and_gradients(kind):
    """A trainable W0 (or hooks, or mixed dtypes) takes the two-op path: same values and delta gradients."""
    fused = layer_with_random_delta(kind, "both", ([0, 5], [1, 2]))
    plain = layer_with_random_delta(kind, "both", ([0, 5], [1, 2]))
    fused.base.requires_grad_(False)
    x, g = torch.randn(3, 4, IN), torch.randn(3, 4, OUT)
    y_fused, y_plain = fused(x), plain(x)
    assert type(y_fused.grad_fn).__name__.startswith("_RowColumnDelta")
    assert not type(y_plain.grad_fn).__name__.startswith("_RowColumnDelta")
    torch.testing.assert_close(y_fused, y_plain)
    y_fused.backward(g)
    y_plain.backward(g)
    for name in ("delta", "delta_columns"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(plain, name).grad)


def test_both_counts_the_overlap_once_and_ignores_the_column_deltas_copy_of_it():
    rows, cols = [1, 4, 6], [0, 3, 4]
    layer = layer_with_random_delta("linear", "both", (rows, cols))
    r = 3
    assert layer.num_trainable == r * IN + r * OUT - r * r == 27
    assert layer.num_stored == r * IN + r * OUT == sum(d.numel() for d in layer.deltas.values())
    assert layer.delta.shape == (r, IN) and layer.delta_columns.shape == (OUT, r)
    x = torch.randn(4, IN)
    before, dense = layer(x), layer.delta_weight()
    with torch.no_grad():
        layer.delta_columns[rows] = 1e3  # the overlap block: one set of weights, owned by the row delta
    assert torch.equal(layer(x), before) and torch.equal(layer.delta_weight(), dense)
    assert "trainable=27" in repr(layer)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_merge_adds_each_delta_once_and_unmerge_restores_w0_bit_exactly(kind, dtype):
    layer = layer_with_random_delta(kind, "both", ([1, 4, 6], [0, 3, 4]), dtype)
    w0 = logical_weight(layer.base).detach().clone()
    # W0 + R + C, the overlap from R alone, summed in the deltas' float32 and rounded once to W0's dtype
    assert layer.delta.dtype == layer.delta_columns.dtype == torch.float32
    expected = (w0.float() + layer.delta_weight().detach()).to(dtype)
    x = torch.randn(2, 3, IN, dtype=dtype)
    before = layer(x)
    merged = layer.merge()
    assert torch.equal(logical_weight(merged), expected)
    torch.testing.assert_close(merged(x), before, **({} if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)))
    assert torch.equal(layer(x), merged(x))
    layer.unmerge()
    assert torch.equal(logical_weight(layer.base), w0) and not layer.merged
    assert torch.equal(layer(x), before)


def test_both_meta_device_init_then_materialise_restores_indices_and_loaded_deltas():
    with torch.device("meta"):
        base = nn.Linear(IN, OUT)
    layer = RoCoFTLinear(base, "both", torch.tensor([0, 5]), torch.tensor([1, 3]))
    assert layer.delta.is_meta and layer.delta_columns.is_meta and layer.column_indices.is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.indices.tolist() == [0, 5] and layer.column_indices.tolist() == [1, 3]
    assert torch.equal(layer.delta, torch.zeros(2, IN)) and torch.equal(layer.delta_columns, torch.zeros(OUT, 2))

    with torch.device("meta"):
        base = nn.Linear(IN, OUT)
    layer = RoCoFTLinear(base, "both", torch.tensor([0, 5]), torch.tensor([1, 3]))
    d, dc = torch.randn(2, IN), torch.randn(OUT, 2)
    layer.load_delta(d, dc)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.equal(layer.delta, d) and torch.equal(layer.delta_columns, dc)
    with pytest.raises(ValueError, match="mode 'both' needs them"):
        layer.load_delta(d)


def test_both_index_buffers_are_persistent_and_restored_by_state_dict():
    a = layer_with_random_delta("linear", "both", ([1, 2], [0, 4]))
    b = make_layer(make_base("linear"), "both", ([3, 5], [1, 2]))
    named = {f"adapters.default.{k}" for k in ("delta", "delta_columns", "indices", "column_indices")}
    assert set(a.state_dict()) == named | {"base.weight", "base.bias"}
    b.load_state_dict(a.state_dict())
    assert b.indices.tolist() == [1, 2] and b.column_indices.tolist() == [0, 4]
    assert {k: v.tolist() for k, v in b.cpu_indices().items()} == {"indices": [1, 2], "column_indices": [0, 4]}
    x = torch.randn(3, IN)
    torch.testing.assert_close(b(x), a(x))


def test_a_state_dict_from_before_named_adapters_loads_into_the_active_adapter():
    """Checkpoints written before adapters had names hold <layer>.delta, <layer>.indices, ... (strict loading)."""
    a = layer_with_random_delta("linear", "both", ([1, 2], [0, 4]))
    old = {"0." + k.replace("adapters.default.", ""): v for k, v in a.state_dict().items()}
    assert "0.delta_columns" in old
    b = nn.Sequential(make_layer(make_base("linear"), "both", ([3, 5], [1, 2])))
    b.load_state_dict(old)
    assert b[0].indices.tolist() == [1, 2] and b[0].column_indices.tolist() == [0, 4]
    assert b[0].cpu_indices()["column_indices"].tolist() == [0, 4]
    x = torch.randn(3, IN)
    torch.testing.assert_close(b(x), a(x))


def test_other_modes_have_no_column_tensors():
    layer = layer_with_random_delta("linear", "row", [1, 2])
    assert layer.delta_columns is None and layer.column_indices is None
    assert set(layer.state_dict()) == {"adapters.default.delta", "adapters.default.indices", "base.weight", "base.bias"}
    assert list(layer.deltas) == ["delta"] and list(layer.index_sets) == ["indices"]
    assert layer.num_trainable == layer.num_stored == 2 * IN


def test_every_config_mode_has_a_layout():
    from rocoft_pl.config import MODES
    from rocoft_pl.layers import PARTS

    assert tuple(PARTS) == MODES
    assert [p.indices for p in PARTS["both"]] == ["indices", "column_indices"]
    assert [p.delta for p in PARTS["both"]] == ["delta", "delta_columns"]


@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_deltas_stay_float32_masters_on_a_bf16_w0_and_keep_updates_bf16_rounds_away(mode):
    """bf16-true converts the whole model (``.to(torch.bfloat16)``) after RoCoFT adapted it: W0 and the input go
    to bf16, the deltas (and their gradients) stay float32, so an update below bf16's resolution is kept."""
    idx = {"indices": torch.tensor([1, 4])} if mode != "both" else {"indices": torch.tensor([1, 4]), "column_indices": torch.tensor([0, 2])}
    layer = RoCoFTLinear(nn.Linear(IN, OUT), mode, **idx).to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16
    assert all(d.dtype == torch.float32 for d in layer.deltas.values())
    with torch.no_grad():
        for d in layer.deltas.values():
            d.fill_(1.0)
    layer(torch.randn(4, IN, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    delta = layer.delta
    assert delta.grad.dtype == torch.float32 and delta.grad.abs().min() > 0
    before = delta.detach().clone()
    layer.to(torch.bfloat16)  # again, with gradients present: values and dtypes untouched
    assert torch.equal(delta, before) and delta.dtype == delta.grad.dtype == torch.float32
    step = 1e-3 / delta.grad.abs().max()  # every |update| <= 1e-3: below half of bf16's spacing at 1.0 (2^-7)
    torch.optim.SGD([delta], lr=float(step)).step()
    assert (delta != 1.0).all()  # the float32 master moved everywhere
    as_bf16 = torch.ones_like(delta, dtype=torch.bfloat16) - (step * delta.grad).to(torch.bfloat16)
    assert (as_bf16 == 1.0).all()  # a bf16 delta would not have moved at all


def test_a_trained_bias_is_a_float32_master_too():
    """train_bias: the bias trains next to the deltas (FSDP2 needs one dtype for the trained tensors of a unit)."""
    layer = RoCoFTLinear(nn.Linear(IN, OUT), "row", torch.tensor([0, 2]))
    layer.train_bias()
    layer.to(torch.bfloat16)
    assert layer.base.bias.dtype == torch.float32 and layer.base.bias.requires_grad
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x, layer.base.weight, layer.base.bias.to(torch.bfloat16))
    torch.testing.assert_close(y, expected)  # zero deltas: W0 x + b
    y.float().sum().backward()
    assert layer.base.bias.grad.dtype == torch.float32


def test_merge_gives_a_plain_layer_in_w0s_dtype_and_unmerge_the_float32_bias_back():
    layer = RoCoFTLinear(nn.Linear(IN, OUT), "row", torch.tensor([0, 2]))
    layer.train_bias()
    layer.to(torch.bfloat16)
    with torch.no_grad():
        layer.base.bias.add_(1e-4)  # below bf16's resolution near the bias values: lost if rounded for good
    master = layer.base.bias.detach().clone()
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    merged = layer.merge()
    assert merged.bias.dtype == merged.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged(x), layer(x))
    layer.unmerge()
    assert layer.base.bias.dtype == torch.float32 and torch.equal(layer.base.bias, master)
