"""Adapters that travel: hot swap of merged adapters (swap_merged_adapter) and mixed-adapter batches
(mixed_adapters), on tiny BERT and Llama models with two adapters that select different rows."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_bert

from rocoft_pl import (
    RoCoFTConfig,
    add_adapter,
    disable_adapter,
    merge_rocoft,
    mixed_adapters,
    rocoft_layers,
    set_adapter,
    swap_merged_adapter,
    unmerge_rocoft,
)
from rocoft_pl.layers import MixedBatch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_causal_lm import tiny_gpt2, tiny_llama  # noqa: E402

A = RoCoFTConfig(rank=2, selection="random", seed=1, modules_to_save=[])
B = RoCoFTConfig(mode="both", rank=3, selection="random", seed=2, modules_to_save=[])
C = RoCoFTConfig(mode="column", rank=2, selection="random", seed=3, modules_to_save=[])
MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def inputs(n=4):
    b = batch(n=n, vocab=64)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def out(model, **kw):
    with torch.no_grad():
        return model(**(kw or inputs())).logits


def perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            for d in layer.adapters[name].deltas.values():
                d.copy_(torch.randn(d.shape, generator=g) * 0.1)


def build(kind, configs=(("a", A), ("b", B))):
    model = MODELS[kind]().eval()
    for seed, (name, config) in enumerate(configs):
        add_adapter(model, name, config)
        perturb(model, name, 10 + seed)
    return model


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}


def plain(t):
    """A tensor torch.equal can compare: a quantized (torchao) weight dequantised."""
    return t.dequantize() if hasattr(t, "qdata") else t.clone()


def snapshot(model):
    return (
        {k: plain(v) for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [(layer.active_adapter, layer.disabled, layer.merged, layer.mixed) for layer in rocoft_layers(model).values()],
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[1:] == before[1:] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])


@pytest.fixture(params=["bert", "llama"])
def kind(request):
    return request.param


def test_the_two_adapters_select_different_rows(kind):
    model = build(kind)
    layer = next(iter(rocoft_layers(model).values()))
    assert not torch.equal(layer.adapters["a"].indices, layer.adapters["b"].indices)


def test_swap_gives_exactly_the_other_adapters_merged_model_and_w0_comes_back_bit_exactly(kind):
    model = build(kind)
    w0 = weights(model)
    set_adapter(model, "b")
    merge_rocoft(model)
    merged_b, weights_b = out(model), weights(model)
    unmerge_rocoft(model)
    set_adapter(model, "a")
    merge_rocoft(model)
    merged_a, weights_a = out(model), weights(model)

    swap_merged_adapter(model, "b")
    assert all(layer.active_adapter == "b" and layer.merged for layer in rocoft_layers(model).values())
    assert all(torch.equal(weights(model)[k], weights_b[k]) for k in w0)
    assert torch.equal(out(model), merged_b)
    assert all(layer.adapters["b"].delta.requires_grad for layer in rocoft_layers(model).values())
    assert not any(layer.adapters["a"].delta.requires_grad for layer in rocoft_layers(model).values())

    swap_merged_adapter(model, "a")
    assert all(torch.equal(weights(model)[k], weights_a[k]) for k in w0)
    assert torch.equal(out(model), merged_a)
    swap_merged_adapter(model, "b")
    unmerge_rocoft(model)
    assert all(torch.equal(weights(model)[k], w0[k]) for k in w0)


def test_a_to_b_to_a_then_unmerge_gives_w0_bit_exactly(kind):
    model = build(kind)
    w0, plain_a = weights(model), out(model)
    merge_rocoft(model)
    swap_merged_adapter(model, "b")
    swap_merged_adapter(model, "a")
    unmerge_rocoft(model)
    assert all(torch.equal(weights(model)[k], w0[k]) for k in w0)
    assert torch.equal(out(model), plain_a)


def test_swap_touches_only_the_two_adapters_rows():
    model = build("bert")
    merge_rocoft(model)
    before = {n: layer.base.weight.clone() for n, layer in rocoft_layers(model).items()}
    swap_merged_adapter(model, "b")
    for n, layer in rocoft_layers(model).items():
        changed = (layer.base.weight != before[n]).any(1).nonzero().flatten()
        a, b = layer.adapters["a"], layer.adapters["b"]
        allowed = set(a.indices.tolist()) | set(b.indices.tolist())
        assert set(changed.tolist()) <= allowed or b.mode == "both"  # 'both' also writes its r columns
        if b.mode != "both":
            continue
        rows = torch.ones(layer.out_features, dtype=torch.bool)
        rows[list(allowed)] = False
        cols = torch.ones(layer.in_features, dtype=torch.bool)
        cols[b.column_indices] = False
        untouched = layer.base.weight[rows][:, cols]
        assert torch.equal(untouched, before[n][rows][:, cols])


def test_swapping_to_the_merged_adapter_changes_nothing():
    model = build("llama")
    merge_rocoft(model)
    before = snapshot(model)
    swap_merged_adapter(model, "a")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "merged, name, match",
    [
        (False, "b", "no adapter is merged"),
        (True, "nope", "no RoCoFT adapter named 'nope'"),
    ],
)
def test_bad_swaps_leave_the_model_unchanged(merged, name, match):
    model = build("bert")
    if merged:
        merge_rocoft(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        swap_merged_adapter(model, name)
    assert_unchanged(model, before)


def test_a_swap_with_re_selected_layers_is_refused():
    model = build("bert")
    merge_rocoft(model)
    layer = next(iter(rocoft_layers(model).values()))
    layer.reselection = object()  # what rocoft_pl.reselect.fold leaves on a layer
    before = snapshot(model)
    with pytest.raises(ValueError, match="re-selected"):
        swap_merged_adapter(model, "b")
    assert_unchanged(model, before)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
def test_a_quantized_base_that_cannot_take_the_other_adapter_exactly_refuses_the_swap():
    from rocoft_pl.quantized import quantize_in_memory

    model = quantize_in_memory(tiny_llama().eval(), "torchao-int8")
    add_adapter(model, "a", A)  # zero deltas: merges exactly (W0 unchanged)
    add_adapter(model, "b", B)
    perturb(model, "b", 3)  # a trained adapter: int8 W0 + D is not int8
    merge_rocoft(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="swap_merged_adapter to 'b'.*not exactly representable"):
        swap_merged_adapter(model, "b")
    assert_unchanged(model, before)


def per_example(model, names):
    """Each example run alone, with its own adapter active (or, for '__base__', disable_adapter)."""
    ids = inputs()
    rows = []
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in ids.items()}
        if name == "__base__":
            with disable_adapter(model):
                rows.append(out(model, **one))
        else:
            set_adapter(model, name)
            rows.append(out(model, **one))
    set_adapter(model, "a")
    return torch.cat(rows)


@pytest.mark.parametrize("second", ["both", "column", "row"])
def test_a_mixed_batch_equals_each_example_run_with_its_own_adapter(kind, second):
    config = {"both": B, "column": C, "row": RoCoFTConfig(rank=3, selection="random", seed=4, modules_to_save=[])}
    model = build(kind, (("a", A), ("b", config[second])))
    names = ["a", "b", "__base__", "a"]
    expected = per_example(model, names)
    with mixed_adapters(model, names):
        got = out(model)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert all(layer.mixed is None for layer in rocoft_layers(model).values())
    torch.testing.assert_close(out(model), out(model))  # the normal forward is back
    with disable_adapter(model):
        base = out(model)
    assert not torch.allclose(got[1], base[1]) and torch.allclose(got[2], base[2], atol=1e-6)


@pytest.mark.parametrize("mode", ["row", "column", "both"])
@pytest.mark.parametrize("model_kind", ["bert", "llama", "gpt2"])
def test_adapters_of_one_mode_and_rank_share_one_batched_product_equal_to_each_example_alone(model_kind, mode):
    same = [RoCoFTConfig(mode=mode, rank=2, selection="random", seed=s, modules_to_save=[]) for s in (1, 2, 3)]
    model = build(model_kind, (("a", same[0]), ("b", same[1]), ("c", same[2])))
    names = ["c", "a", "__base__", "b"]
    batch = MixedBatch.of(names)
    layer = next(iter(rocoft_layers(model).values()))
    assert batch.per_example([layer.adapters[n] for n, _ in batch.groups]) is not None  # the batched path
    expected = per_example(model, names)
    with mixed_adapters(model, names):
        got = out(model)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    with disable_adapter(model):
        assert torch.equal(out(model)[2], got[2])  # a base example: + 0 from the zero delta, exactly


def test_a_mixed_batch_on_gpt2_conv1d_layers_equals_each_example_run_alone():
    model = build("gpt2")
    names = ["b", "__base__", "a", "b"]
    expected = per_example(model, names)
    with mixed_adapters(model, names):
        got = out(model)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_mixed_adapters_restores_the_layers_after_an_exception():
    model = build("bert")
    with pytest.raises(KeyError):
        with mixed_adapters(model, ["a", "b", "a", "b"]):
            raise KeyError("boom")
    assert all(layer.mixed is None for layer in rocoft_layers(model).values())


def test_a_batch_of_another_size_or_grad_mode_raises_and_the_layers_are_restored():
    model = build("llama")
    with pytest.raises(ValueError, match="3 adapter names for a batch of 4"):
        with mixed_adapters(model, ["a", "b", "a"]):
            out(model)
    with pytest.raises(RuntimeError, match="inference"):
        with mixed_adapters(model, ["a", "b", "a", "b"]):
            model(**inputs())
    assert all(layer.mixed is None for layer in rocoft_layers(model).values())


def test_bad_mixed_requests_are_refused_with_the_model_unchanged():
    model = build("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="one name per example"):
        with mixed_adapters(model, ["a", "nope"]):
            pass
    with pytest.raises(ValueError, match="one name per example"):
        with mixed_adapters(model, []):
            pass
    with disable_adapter(model):
        with pytest.raises(ValueError, match="inside disable_adapter"):
            with mixed_adapters(model, ["a"] * 4):
                pass
    with mixed_adapters(model, ["a"] * 4):
        with pytest.raises(ValueError, match="inside mixed_adapters"):
            with mixed_adapters(model, ["b"] * 4):
                pass
    assert_unchanged(model, before)
    merge_rocoft(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        with mixed_adapters(model, ["a"] * 4):
            pass
    assert_unchanged(model, before)


def test_mode_entries_is_refused_in_a_mixed_batch():
    model = build("bert", (("a", A), ("e", RoCoFTConfig(mode="entries", rank=4, selection="random", seed=5, modules_to_save=[]))))
    with pytest.raises(ValueError, match="entries"):
        with mixed_adapters(model, ["a", "e", "a", "e"]):
            pass
    with torch.no_grad(), mixed_adapters(model, ["a", "__base__", "a", "a"]):
        model(**inputs())  # an entries adapter that no example uses is fine
