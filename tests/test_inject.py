"""apply_rocoft / merge_rocoft / unload_rocoft on real transformers architectures (tiny configs), and the paper's counts."""

import re

import pytest
import torch
from conftest import batch, tiny_bert, tiny_gpt2
from transformers import RobertaConfig, RobertaForSequenceClassification

from rocoft_pl import RoCoFTConfig, RoCoFTLinear, apply_rocoft, merge_rocoft, rocoft_layers, unload_rocoft, unmerge_rocoft


def roberta_on_meta(**kw):
    with torch.device("meta"):
        return RobertaForSequenceClassification(RobertaConfig(**kw))


LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


@pytest.mark.parametrize(
    "size,mode,rank,expected",
    [
        ({}, "row", 1, 82_944),
        ({}, "row", 3, 248_832),
        ({}, "column", 1, 82_944),
        ({}, "column", 3, 248_832),
        (LARGE, "row", 1, 221_184),
        (LARGE, "row", 3, 663_552),
        (LARGE, "column", 3, 663_552),
    ],
)
def test_paper_parameter_counts(size, mode, rank, expected):
    model = roberta_on_meta(**size)
    report = apply_rocoft(model, RoCoFTConfig(mode=mode, rank=rank))
    assert report.rocoft_params == expected
    assert len(report.modules) == 6 * model.config.num_hidden_layers
    # The head trains fully and is counted separately, never as RoCoFT parameters.
    head = sum(p.numel() for p in model.classifier.parameters())
    assert report.head_params == head
    assert report.trainable_params == expected + head
    assert "RoCoFT parameters:" in str(report) and f"{expected:,}" in str(report)


def test_default_targets_exclude_embeddings_pooler_and_head():
    model = tiny_bert()
    apply_rocoft(model, RoCoFTConfig(rank=1))
    names = set(rocoft_layers(model))
    assert all(".encoder.layer." in n for n in names)
    assert len(names) == 12
    assert not isinstance(model.bert.pooler.dense, RoCoFTLinear)


def test_zero_delta_model_matches_the_reference_model_exactly():
    ref, model = tiny_bert(), tiny_bert()
    apply_rocoft(model, RoCoFTConfig(mode="column", rank=2))
    b = batch()
    torch.testing.assert_close(model(**b).logits, ref(**b).logits, rtol=0, atol=0)


def test_freezing_and_trainable_set():
    model = tiny_bert()
    report = apply_rocoft(model, RoCoFTConfig(rank=2, train_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".delta", ".base.bias")) or n.startswith("classifier.") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.trainable_params
    assert report.bias_params == sum(l.base.bias.numel() for l in rocoft_layers(model).values())


def test_gpt2_conv1d_rows_are_output_features_and_lm_head_stays_frozen():
    model = tiny_gpt2()
    report = apply_rocoft(model, RoCoFTConfig(mode="row", rank=2))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, RoCoFTLinear) and layer.transposed
    assert (layer.out_features, layer.in_features) == (48, 16)
    assert layer.delta.shape == (2, 16)
    assert report.head_params == 0
    assert not model.lm_head.weight.requires_grad


def test_suffix_and_regex_targets():
    model = tiny_bert()
    apply_rocoft(model, RoCoFTConfig(targets=["query", "value"], rank=1))
    assert sorted({n.rsplit(".", 1)[1] for n in rocoft_layers(model)}) == ["query", "value"]
    model = tiny_bert()
    apply_rocoft(model, RoCoFTConfig(targets=r".*layer\.1\..*dense", rank=1))
    assert set(rocoft_layers(model)) == {
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense",
    }


def test_explicit_modules_to_save_and_no_head():
    model = tiny_gpt2()
    report = apply_rocoft(model, RoCoFTConfig(rank=1, modules_to_save=["lm_head"]))
    assert report.head_params == model.lm_head.weight.numel()
    model = tiny_bert()
    report = apply_rocoft(model, RoCoFTConfig(rank=1, modules_to_save=[]))
    assert report.head_params == 0 and not model.classifier.weight.requires_grad


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m) for m in model.modules()],
    )


def assert_same(model, before):
    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2] and before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


@pytest.mark.parametrize(
    "config,match",
    [
        (RoCoFTConfig(targets=["nothing_here"]), "match nothing"),
        (RoCoFTConfig(rank=17), "exceeds"),
        (RoCoFTConfig(mode="column", rank=25), "exceeds"),
        (RoCoFTConfig(selection="max"), "calibration"),
        (RoCoFTConfig(modules_to_save=["no_such_head"]), "modules_to_save"),
    ],
)
def test_bad_requests_raise_and_leave_the_model_unchanged(config, match):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        apply_rocoft(model, config)
    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_applying_twice_is_refused():
    model = tiny_bert()
    apply_rocoft(model, RoCoFTConfig(rank=1))
    with pytest.raises(ValueError, match="already has RoCoFT"):
        apply_rocoft(model, RoCoFTConfig(rank=1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="diagonal"), "mode"),
        (dict(mode="both", selection="first", p=0.0), "p must"),
        (dict(mode="both", rank=0), "rank"),
        (dict(rank=0), "rank"),
        (dict(rank=1.5), "rank"),
        (dict(p=0.0), "p must"),
        (dict(p=1.5), "p must"),
        (dict(selection="best"), "selection"),
        (dict(mode="entries", selection="first"), "entries"),
        (dict(targets="(unclosed"), "regex"),
        (dict(targets=[]), "targets"),
        (dict(modules_to_save="classifier"), "modules_to_save"),
        (dict(train_bias="yes"), "train_bias"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoCoFTConfig(**kwargs)


@pytest.mark.parametrize("model_fn", [tiny_bert, tiny_gpt2])
@pytest.mark.parametrize("mode", ["row", "column", "entries", "both"])
def test_merge_keeps_the_wrappers_and_unload_gives_plain_layers_that_save_pretrained_round_trips(tmp_path, model_fn, mode):
    model = model_fn()
    cfg = RoCoFTConfig(mode=mode, rank=2, selection="random" if mode == "entries" else "first", p=0.2)
    apply_rocoft(model, cfg)
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            for delta in layer.deltas.values():
                delta.normal_(std=0.1)
    b = batch()
    b = {k: v for k, v in b.items() if k != "labels"}
    before = model(**b).logits
    layers = rocoft_layers(model)
    assert merge_rocoft(model) is model
    assert rocoft_layers(model) == layers and all(l.merged for l in layers.values())  # the same wrappers, merged
    merged = model(**b).logits
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    assert unload_rocoft(model) is model
    assert not rocoft_layers(model)
    assert all(model.get_submodule(n) is l.base for n, l in layers.items())
    assert torch.equal(model(**b).logits, merged)  # the merged wrapper's forward is the plain layer's
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**b).logits, before, rtol=1e-5, atol=1e-5)


def test_unload_of_an_unmerged_model_gives_the_base_model_and_apply_works_again():
    model, ref = tiny_bert(), tiny_bert()
    apply_rocoft(model, RoCoFTConfig(rank=2, train_bias=True))
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            layer.delta.normal_(std=0.1)
    unload_rocoft(model)
    b = {k: v for k, v in batch().items() if k != "labels"}
    assert not rocoft_layers(model)
    assert torch.equal(model(**b).logits, ref(**b).logits)  # W0: the deltas dropped (the biases were not trained)
    assert not any("_rocoft_head" in vars(m) for m in model.modules())
    apply_rocoft(model, RoCoFTConfig(rank=1, modules_to_save=[]))
    assert rocoft_layers(model) and not any(p.requires_grad for p in model.classifier.parameters())


@pytest.mark.parametrize("model_fn", [tiny_bert, tiny_gpt2])
@pytest.mark.parametrize("mode", ["row", "both"])
def test_unmerge_puts_the_trainable_layers_back_and_w0_exactly(model_fn, mode):
    model = model_fn()
    apply_rocoft(model, RoCoFTConfig(rank=2, mode=mode))
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            for delta in layer.deltas.values():
                delta.normal_(std=0.1)
    w0 = {n: l.base.weight.clone() for n, l in rocoft_layers(model).items()}
    deltas = {n: l.deltas for n, l in rocoft_layers(model).items()}
    b = {k: v for k, v in batch().items() if k != "labels"}
    before = model(**b).logits
    merge_rocoft(model)
    assert not any(torch.equal(l.base.weight, w0[n]) for n, l in rocoft_layers(model).items())
    assert unmerge_rocoft(model) is model
    layers = rocoft_layers(model)
    assert set(layers) == set(w0)
    for name, layer in layers.items():
        assert torch.equal(layer.base.weight, w0[name]) and not layer.merged
        assert all(d is deltas[name][k] for k, d in layer.deltas.items())
    after = model(**b).logits
    torch.testing.assert_close(after, before)
    after.square().mean().backward()  # trains again: gradients reach the deltas
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for l in layers.values() for d in l.deltas.values())
    merge_rocoft(model)  # and merges again
    assert all(l.merged for l in rocoft_layers(model).values())


def test_unmerge_of_an_unmerged_model_is_refused_and_changes_nothing():
    model = tiny_bert()
    with pytest.raises(ValueError, match="no RoCoFT layers merged"):
        unmerge_rocoft(model)
    apply_rocoft(model, RoCoFTConfig(rank=1))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no RoCoFT layers merged"):
        unmerge_rocoft(model)
    assert_same(model, before)
    merge_rocoft(model)
    merge_rocoft(model)  # a no-op: merged once
    unmerge_rocoft(model)
    assert_same(model, before)


def test_entries_mode_counts_about_p_of_each_matrix():
    model = tiny_bert()
    report = apply_rocoft(model, RoCoFTConfig(mode="entries", selection="random", p=0.25))
    total = sum(l.out_features * l.in_features for l in rocoft_layers(model).values())
    assert 0.2 < report.rocoft_params / total < 0.3


def perturbed(model, config):
    apply_rocoft(model, config)
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            for delta in layer.deltas.values():
                delta.normal_(std=0.1)
    return {n: l.delta.detach().clone() for n, l in rocoft_layers(model).items()}


def weights(model):
    return {
        n.replace(".base.", "."): p.detach().clone()
        for n, p in model.named_parameters()
        if not n.endswith((".delta", ".delta_columns"))
    }


@pytest.mark.parametrize("mode", ["row", "column", "entries", "both"])
def test_a_second_adapter_over_merged_weights_goes_through_unload(mode):
    """apply on an adapted model (merged or not) is refused; stacking two adapters is merge -> unload -> apply ->
    merge -> unload, which gives W0 + D1 + D2 (and has no way back: the records are the layers')."""
    model = tiny_bert()
    extra = dict(selection="random", p=0.2) if mode == "entries" else {}
    d1 = perturbed(model, RoCoFTConfig(mode=mode, rank=2, seed=1, **extra))
    b = {k: v for k, v in batch().items() if k != "labels"}
    merge_rocoft(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already has RoCoFT layers.*add_adapter.*unload_rocoft"):
        apply_rocoft(model, RoCoFTConfig(mode=mode, rank=3, seed=2, **extra))
    assert_same(model, before)
    unload_rocoft(model)
    w1 = weights(model)  # W0 + D1
    d2 = perturbed(model, RoCoFTConfig(mode=mode, rank=3, seed=2, targets=["query", "value"], **extra))
    assert d2.keys() != d1.keys()
    out2 = model(**b).logits
    merge_rocoft(model)
    torch.testing.assert_close(model(**b).logits, out2, rtol=1e-5, atol=1e-5)
    unmerge_rocoft(model)
    assert all(torch.equal(weights(model)[n], w) for n, w in w1.items())  # back to W0 + D1 exactly


def test_merge_state_lives_in_the_layers_so_a_holder_and_its_model_agree():
    """As with a LightningModule: merge on the inner model, unmerge on the holder (or the other way round);
    nothing is recorded on the user's modules."""
    holder = torch.nn.Module()
    holder.model = tiny_bert()
    apply_rocoft(holder.model, RoCoFTConfig(rank=1))
    perturbed_w0 = {n: l.base.weight.clone() for n, l in rocoft_layers(holder).items()}
    merge_rocoft(holder.model)
    assert unmerge_rocoft(holder) is holder
    assert all(torch.equal(l.base.weight, perturbed_w0[n]) for n, l in rocoft_layers(holder).items())
    merge_rocoft(holder)
    unmerge_rocoft(holder.model)
    assert not any(k.startswith("_rocoft") and k != "_rocoft_head" for m in holder.modules() for k in vars(m))


# -- mode 'both' -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,rank,expected",
    [({}, 1, 165_816), ({}, 3, 497_016), (LARGE, 1, 442_224), (LARGE, 3, 1_325_808)],
)
def test_both_counts_rows_plus_columns_with_the_overlap_once(size, rank, expected):
    """Per matrix r*in + r*out - r*r: the row count plus the column count (equal for the default targets)
    minus r*r for each of the 6 matrices of every block; the tensors hold r*r more per matrix."""
    model = roberta_on_meta(**size)
    report = apply_rocoft(model, RoCoFTConfig(mode="both", rank=rank))
    row = apply_rocoft(roberta_on_meta(**size), RoCoFTConfig(mode="row", rank=rank)).rocoft_params
    matrices = 6 * model.config.num_hidden_layers
    assert report.rocoft_params == expected == 2 * row - matrices * rank * rank
    assert all(m.trainable == rank * (m.in_features + m.out_features - rank) for m in report.modules)
    assert all(m.selected == 2 * rank and m.mode == "both" for m in report.modules)
    stored = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".delta", ".delta_columns")))
    assert stored == expected + matrices * rank * rank
    head = sum(p.numel() for p in model.classifier.parameters())
    assert report.trainable_params == expected + head and report.other_trainable_params == 0
    assert f"{expected:,}" in str(report) and "both" in report.table()


def test_both_freezes_everything_but_the_two_deltas_bias_and_head():
    model = tiny_bert()
    report = apply_rocoft(model, RoCoFTConfig(mode="both", rank=2, train_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".delta", ".delta_columns", ".base.bias")) or n.startswith("classifier.") for n in trainable)
    assert sum(n.endswith(".delta_columns") for n in trainable) == 12
    overlap = 12 * 2 * 2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.trainable_params + overlap


def test_both_on_gpt2_conv1d_rows_are_output_features_and_columns_input_features():
    model = tiny_gpt2()
    apply_rocoft(model, RoCoFTConfig(mode="both", rank=2))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.transposed and (layer.out_features, layer.in_features) == (48, 16)
    assert layer.delta.shape == (2, 16) and layer.delta_columns.shape == (48, 2)
    ref = tiny_gpt2()
    ids = batch()["input_ids"]
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)  # zero deltas: the base model


def test_explicit_both_indices_and_a_missing_column_set_is_refused_with_the_model_intact():
    model = tiny_bert()
    names = [n for n, m in model.named_modules() if n.endswith(("query", "key"))]
    cfg = RoCoFTConfig(mode="both", rank=1, targets=["query", "key"])
    explicit = {n: {"indices": torch.tensor([3]), "column_indices": torch.tensor([5])} for n in names}
    apply_rocoft(model, cfg, indices=explicit)
    assert all(l.indices.tolist() == [3] and l.column_indices.tolist() == [5] for l in rocoft_layers(model).values())
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="mode 'both' needs them"):
        apply_rocoft(fresh, cfg, indices={n: torch.tensor([3]) for n in names})
    assert [type(m) for m in fresh.modules()] == before[2]
