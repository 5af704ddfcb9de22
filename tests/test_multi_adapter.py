"""Several adapters on one base: add / set / delete / disable by name, save and load per name, merge and unload,
and every bad input refused with the model unchanged."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_bert

from rocoft_pl import (
    RoCoFTConfig,
    active_adapter,
    adapter_names,
    add_adapter,
    apply_rocoft,
    delete_adapter,
    disable_adapter,
    load_adapter,
    merge_rocoft,
    rocoft_layers,
    save_adapter,
    set_adapter,
    unload_rocoft,
    unmerge_rocoft,
)
from rocoft_pl.reselect import fold

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_causal_lm import tiny_llama  # noqa: E402

# Two adapters that train different rows (and, for b, another mode and rank) of the same layers.
A = RoCoFTConfig(rank=2, selection="random", seed=1, modules_to_save=[])
B = RoCoFTConfig(mode="both", rank=3, selection="random", seed=2, modules_to_save=[])
MODELS = {"bert": tiny_bert, "llama": tiny_llama}


def inputs(kind):
    """Token ids (below both models' vocabularies) with padding."""
    b = batch(vocab=64)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def out(model, kind):
    with torch.no_grad():
        return model(**inputs(kind)).logits


def perturb(model, seed, adapter_name=None):
    """Seeded random values in one adapter's deltas (default: the active one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            adapter = layer.adapter if adapter_name is None else layer.adapters[adapter_name]
            for d in adapter.deltas.values():
                d.copy_(torch.randn(d.shape, generator=g) * 0.1)


def single(kind, config, seed):
    """The single-adapter model an adapter of the multi-adapter model must reproduce."""
    model = MODELS[kind]().eval()
    apply_rocoft(model, config)
    perturb(model, seed)
    return model


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m) for m in model.modules()],
        [(layer.active_adapter, layer.disabled, layer.merged) for layer in rocoft_layers(model).values()],
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[1:] == before[1:] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])


@pytest.fixture(params=["bert", "llama"])
def two(request, tmp_path):
    """(kind, a model with adapters 'a' (active) and 'b' loaded from the single-adapter models' files, those two
    models)."""
    kind = request.param
    ref_a, ref_b = single(kind, A, 11), single(kind, B, 12)
    save_adapter(ref_a, tmp_path / "a")
    save_adapter(ref_b, tmp_path / "b")
    model = MODELS[kind]().eval()
    add_adapter(model, "a", tmp_path / "a")  # a model without adapters: its first, active
    add_adapter(model, "b", tmp_path / "b")
    return kind, model, ref_a, ref_b


def test_set_adapter_switches_to_exactly_each_single_adapter_models_outputs(two):
    kind, model, ref_a, ref_b = two
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "a"
    layers = rocoft_layers(model)
    assert any(not torch.equal(l.adapters["a"].indices, l.adapters["b"].indices) for l in layers.values())
    assert torch.equal(out(model, kind), out(ref_a, kind))
    set_adapter(model, "b")
    assert active_adapter(model) == "b" and all(l.mode == "both" and l.indices.numel() == 3 for l in layers.values())
    assert torch.equal(out(model, kind), out(ref_b, kind))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)  # only the active adapter's deltas train
    set_adapter(model, "a")
    assert torch.equal(out(model, kind), out(ref_a, kind))
    assert all(".adapters.a." in n for n, p in model.named_parameters() if p.requires_grad)


def test_the_active_adapter_trains_and_the_other_stays_as_it_was(two):
    kind, model, _, _ = two
    set_adapter(model, "b")
    a_before = {n: p.clone() for n, p in model.named_parameters() if ".adapters.a." in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(**inputs(kind)).logits.square().mean().backward()
    opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) and params[n].grad is None for n, p in a_before.items())
    assert all(p.grad is not None for n, p in params.items() if ".adapters.b." in n)


def test_disable_adapter_gives_the_base_outputs_bit_exactly_and_restores_after(two):
    kind, model, ref_a, _ = two
    base = MODELS[kind]().eval()
    adapted = out(model, kind)
    assert not torch.equal(adapted, out(base, kind))
    # A KL-to-base / DPO reference: the policy's logits with grad, the base's under no_grad, one model.
    policy = model(**inputs(kind)).logits
    with disable_adapter(model) as same:
        assert same is model
        assert torch.equal(out(model, kind), out(base, kind))
        with torch.no_grad():
            reference = model(**inputs(kind)).logits
    assert torch.equal(reference, out(base, kind))
    (policy - reference).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".adapters.a." in n)
    assert torch.equal(out(model, kind), adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with disable_adapter(model):
            raise RuntimeError("inside")
    assert torch.equal(out(model, kind), adapted) and not any(l.disabled for l in rocoft_layers(model).values())
    with disable_adapter(model):  # nested: the inner exit leaves the outer one in force
        with disable_adapter(model):
            pass
        assert torch.equal(out(model, kind), out(base, kind))


def test_delete_adapter(two):
    kind, model, ref_a, _ = two
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'a' is the active adapter; set_adapter\(model, \.\.\.\) to one of \['b'\]"):
        delete_adapter(model, "a")
    assert_unchanged(model, before)
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"] and not any(".adapters.b." in k for k in model.state_dict())
    assert torch.equal(out(model, kind), out(ref_a, kind))
    delete_adapter(model, "a")  # the last one: the plain base layers again
    assert not rocoft_layers(model)
    assert torch.equal(out(model, kind), out(MODELS[kind]().eval(), kind))


def test_save_and_load_per_name_round_trip(two, tmp_path):
    kind, model, ref_a, ref_b = two
    save_adapter(model, tmp_path / "b-again", adapter_name="b")  # while 'a' is active
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "b-again" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    save_adapter(model, tmp_path / "active")
    assert json.loads((tmp_path / "active" / "adapter_config.json").read_text())["config"]["mode"] == "row"

    fresh = MODELS[kind]().eval()
    report = load_adapter(fresh, tmp_path / "b-again", adapter_name="b")
    assert adapter_names(fresh) == ["b"] and report.rocoft_params == sum(l.num_trainable for l in rocoft_layers(ref_b).values())
    assert torch.equal(out(fresh, kind), out(ref_b, kind))
    load_adapter(fresh, tmp_path / "a", adapter_name="a")  # a new name: added, inactive
    assert adapter_names(fresh) == ["b", "a"] and active_adapter(fresh) == "b"
    set_adapter(fresh, "a")
    assert torch.equal(out(fresh, kind), out(ref_a, kind))
    load_adapter(fresh, tmp_path / "active", adapter_name="a")  # an existing name: overwritten (same values)
    assert torch.equal(out(fresh, kind), out(ref_a, kind))


def test_load_adapter_reports_the_loaded_adapter(tmp_path):
    ref_b = single("bert", B, 12)
    save_adapter(ref_b, tmp_path / "b")
    model = tiny_bert()
    apply_rocoft(model, A)
    report = load_adapter(model, tmp_path / "b", adapter_name="b")
    assert report.rocoft_params == sum(l.adapters["b"].num_trainable for l in rocoft_layers(model).values())
    assert report.modules[0].mode == "both" and report.trainable_params == report.rocoft_params


def test_an_adapter_added_from_a_config_selects_what_a_fresh_model_would():
    """Wanda scores the added adapter on the base model's activations (the active adapter is disabled then)."""
    wanda = RoCoFTConfig(rank=2, selection="max", modules_to_save=[])
    calibration = [{k: v for k, v in batch().items() if k != "labels"}]
    fresh = tiny_bert()
    apply_rocoft(fresh, wanda, calibration)
    model = tiny_bert()
    apply_rocoft(model, A)
    perturb(model, 11)
    report = add_adapter(model, "w", wanda, calibration)
    assert report.rocoft_params == sum(l.num_trainable for l in rocoft_layers(fresh).values())
    layers = rocoft_layers(model)
    assert all(torch.equal(layers[n].adapters["w"].indices, l.indices) for n, l in rocoft_layers(fresh).items())
    assert active_adapter(model) == "default" and not any(p.requires_grad for n, p in model.named_parameters() if ".w." in n)
    # zero deltas: adapter 'w' gives the base model's outputs
    set_adapter(model, "w")
    assert torch.equal(out(model, "bert"), out(tiny_bert(), "bert"))


def test_merge_keeps_the_wrappers_unmerge_restores_w0_and_unload_gives_the_merged_model(two):
    kind, model, _, ref_b = two
    set_adapter(model, "b")
    w0 = {n: l.base.weight.clone() for n, l in rocoft_layers(model).items()}
    expected = out(model, kind)
    merge_rocoft(model)
    layers = rocoft_layers(model)
    assert all(l.merged for l in layers.values())
    torch.testing.assert_close(out(model, kind), expected, rtol=1e-5, atol=1e-5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'b' is merged into the weights; unmerge_rocoft\(model\) before switching"):
        set_adapter(model, "a")
    with pytest.raises(ValueError, match="merged into the weights"):
        with disable_adapter(model):
            pass
    with pytest.raises(ValueError, match="merged"):
        delete_adapter(model, "b")
    with pytest.raises(ValueError, match="merged"):
        add_adapter(model, "c", A)
    assert_unchanged(model, before)
    set_adapter(model, "b")  # the merged one: nothing to do
    unmerge_rocoft(model)
    assert all(torch.equal(l.base.weight, w0[n]) for n, l in layers.items())
    assert torch.equal(out(model, kind), out(ref_b, kind))
    merge_rocoft(model)
    merged = out(model, kind)
    unload_rocoft(model)
    assert not rocoft_layers(model) and all(model.get_submodule(n) is l.base for n, l in layers.items())
    assert torch.equal(out(model, kind), merged)


# -- bad inputs: a clear error, the model unchanged ----------------------------------------------------------


def test_a_model_without_adapters_refuses_by_name():
    model = tiny_bert()
    before = snapshot(model)
    for call, match in [
        (lambda: set_adapter(model, "a"), "has no RoCoFT adapters"),
        (lambda: active_adapter(model), "has no RoCoFT adapters"),
        (lambda: delete_adapter(model, "a"), "has no RoCoFT adapters"),
        (lambda: disable_adapter(model).__enter__(), "has no RoCoFT adapters"),
        (lambda: save_adapter(model, "/nonexistent/x", adapter_name="a"), "no RoCoFT layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    assert_unchanged(model, before)
    assert adapter_names(model) == []


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, p: set_adapter(m, "c"), r"no RoCoFT adapter named 'c'; the model has \['a', 'b'\]"),
        (lambda m, p: delete_adapter(m, "c"), "no RoCoFT adapter named 'c'"),
        (lambda m, p: save_adapter(m, p / "c", adapter_name="c"), "no RoCoFT adapter named 'c'"),
        (lambda m, p: add_adapter(m, "b", A), "already has an adapter named 'b'"),
        (lambda m, p: add_adapter(m, "b", p / "a"), "already has an adapter named 'b'"),
        (lambda m, p: add_adapter(m, "x.y", A), "adapter name must be"),
        (lambda m, p: add_adapter(m, "keys", A), "adapter name must be"),
        (lambda m, p: add_adapter(m, "c", RoCoFTConfig(rank=1, modules_to_save=[], targets=["query"])), "adapts other layers"),
        (lambda m, p: add_adapter(m, "c", RoCoFTConfig(rank=1)), r"trains the heads \['classifier'\].*modules_to_save=\[\]"),
        (lambda m, p: add_adapter(m, "c", RoCoFTConfig(rank=1, modules_to_save=[], train_bias=True)), "trains biases or heads"),
        (lambda m, p: add_adapter(m, "c", RoCoFTConfig(rank=99, modules_to_save=[])), "exceeds"),
        (lambda m, p: add_adapter(m, "c", 3), "directory or a RoCoFTConfig"),
        (lambda m, p: apply_rocoft(m, A), "already has RoCoFT layers"),
        (lambda m, p: fold(next(iter(rocoft_layers(m).values())), torch.tensor([0, 1])), "one adapter"),
    ],
)
def test_bad_requests_on_two_adapters_leave_the_model_unchanged(tmp_path, call, match):
    model = tiny_bert()
    apply_rocoft(model, A, adapter_name="a")
    add_adapter(model, "b", B)
    save_adapter(single("bert", A, 1), tmp_path / "a")
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        call(model, tmp_path)
    assert_unchanged(model, before)
    assert not (tmp_path / "c").exists()


def test_adapters_of_another_base_or_that_train_biases_or_heads_are_not_added(tmp_path):
    model = tiny_bert()
    apply_rocoft(model, A)
    before = snapshot(model)
    other_base = tiny_bert(vocab_size=80)  # the same layers, another embedding: only the fingerprint differs
    apply_rocoft(other_base, A)
    save_adapter(other_base, tmp_path / "other")
    with pytest.raises(ValueError, match=r"base model differs from the one it was trained on \(vocab_size 80 there, 64 here\)"):
        add_adapter(model, "other", tmp_path / "other")
    with_head = tiny_bert()
    apply_rocoft(with_head, RoCoFTConfig(rank=2))  # trains the classifier
    save_adapter(with_head, tmp_path / "head")
    with pytest.raises(ValueError, match="trains biases or heads"):
        add_adapter(model, "head", tmp_path / "head")
    assert_unchanged(model, before)
    # and the other way round: next to an adapter that trains a head, nothing is added
    with pytest.raises(ValueError, match=r"the model's adapter \['default'\] trains 'classifier'"):
        add_adapter(with_head, "b", B)


def _trained(config, tmp_path, name):
    """A saved adapter of ``config`` whose trained biases / head moved away from the base's (what training does)."""
    source = tiny_bert()
    apply_rocoft(source, config)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.5)
    save_adapter(source, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("what", ["biases", "head", "both"])
def test_per_adapter_biases_or_heads_are_refused_by_name_and_never_change_the_other_adapters(tmp_path, what):
    """One bias or head serves every adapter of a base (PEFT keeps a copy per adapter; RoCoFT does not): an adapter
    that trains them is not added, nor loaded over one of several adapters (its base weights would change the
    others' outputs), and a model whose adapter trains them takes no second adapter. Nothing changes."""
    config = RoCoFTConfig(rank=2, selection="random", seed=3, train_bias=what != "head",
                          modules_to_save=None if what != "biases" else [])
    saved = _trained(config, tmp_path, "trained")
    model = tiny_bert()
    apply_rocoft(model, A, adapter_name="a")
    add_adapter(model, "b", B)
    perturb(model, 1, "a")
    perturb(model, 2, "b")
    before, outputs = snapshot(model), out(model, "bert")
    with pytest.raises(ValueError, match="trains biases or heads"):
        add_adapter(model, "c", saved)
    with pytest.raises(ValueError, match=r"loading it over adapter 'b' would change those weights of the base for the model's other adapters \['a'\]"):
        load_adapter(model, saved, adapter_name="b")
    with pytest.raises(ValueError, match="over adapter 'a'"):
        load_adapter(model, saved)  # the active adapter, by default
    with pytest.raises(ValueError, match="trains biases or heads|trains the heads"):
        add_adapter(model, "c", config)
    assert_unchanged(model, before)
    assert torch.equal(out(model, "bert"), outputs)
    set_adapter(model, "b")
    assert not torch.equal(out(model, "bert"), outputs)  # b is still b
    # a model whose one adapter trains them takes no second one, named by the weight it trains
    lone = tiny_bert()
    load_adapter(lone, saved)
    lone_before = snapshot(lone)
    shared = "base.bias" if what != "head" else "classifier"
    with pytest.raises(ValueError, match=rf"the model's adapter \['default'\] trains '[^']*{shared}'"):
        add_adapter(lone, "b", B)
    assert_unchanged(lone, lone_before)
    load_adapter(lone, saved)  # a one-adapter model still reloads its own adapter, biases and head included


def test_a_single_adapter_model_is_adapter_default_and_works_as_before(tmp_path):
    model = tiny_bert()
    apply_rocoft(model, RoCoFTConfig(rank=2))
    assert adapter_names(model) == ["default"] and active_adapter(model) == "default"
    save_adapter(model, tmp_path)
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert adapter_names(fresh) == ["default"]
    assert all(".adapters.default." in k for k in fresh.state_dict() if k.endswith((".delta", ".indices")))
    merge_rocoft(fresh)
    unmerge_rocoft(fresh)
    load_adapter(fresh, tmp_path)  # onto the model's one adapter: overwritten
    assert adapter_names(fresh) == ["default"]
