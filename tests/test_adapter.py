"""save_adapter / load_adapter: round trips, file contents, and every bad input with the model untouched."""

import hashlib
import json

import pytest
import torch
from conftest import batch, tiny_bert, tiny_gpt2, trained
from safetensors.torch import load_file, save_file

from rocoft_pl import (
    RoCoFTConfig,
    apply_rocoft,
    load_adapter,
    merge_rocoft,
    rocoft_layers,
    save_adapter,
    unload_rocoft,
    unmerge_rocoft,
)


def inputs():
    return {k: v for k, v in batch().items() if k != "labels"}


def index_lists(model):
    return {n: {k: v.tolist() for k, v in l.index_sets.items()} for n, l in rocoft_layers(model).items()}


@pytest.mark.parametrize(
    "model_fn,mode",
    [(tiny_bert, "row"), (tiny_bert, "column"), (tiny_gpt2, "row"), (tiny_bert, "entries"), (tiny_bert, "both"),
     (tiny_gpt2, "both")],
)
def test_round_trip_onto_a_fresh_model(tmp_path, model_fn, mode):
    model = trained(model_fn, mode=mode)
    save_adapter(model, tmp_path)
    fresh = model_fn()
    report = load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(**inputs()).logits, model(**inputs()).logits, rtol=0, atol=0)
    assert index_lists(fresh) == index_lists(model)
    for name, layer in rocoft_layers(model).items():  # bit-identical, the inert overlap of 'both' included
        assert all(torch.equal(d, rocoft_layers(fresh)[name].deltas[k]) for k, d in layer.deltas.items())
    overlap = sum(l.num_stored - l.num_trainable for l in rocoft_layers(fresh).values())  # 'both' only
    assert (overlap > 0) == (mode == "both")
    assert report.trainable_params == sum(p.numel() for p in fresh.parameters() if p.requires_grad) - overlap


def test_files_are_small_and_describe_the_base_model(tmp_path):
    model = trained()
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["base_model"]["architecture"] == "BertForSequenceClassification"
    assert meta["config"]["rank"] == 2 and meta["config"]["mode"] == "row"
    assert meta["targets"]["bert.encoder.layer.0.attention.self.query"]["shape"] == [16, 16]
    assert meta["saved_modules"] == ["classifier"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) >= {"bert.encoder.layer.0.attention.self.query.delta", "classifier.weight"}
    # Nothing frozen is stored: only deltas, indices, trained biases and the head.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(tensors)


def test_saving_from_a_lightning_module_uses_the_backbone_names(tmp_path):
    import lightning.pytorch as pl

    class Wrapper(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert()

    wrapper = Wrapper()
    apply_rocoft(wrapper, RoCoFTConfig(rank=1))
    save_adapter(wrapper, tmp_path)
    names = load_file(tmp_path / "adapter_model.safetensors")
    assert all(not k.startswith("model.") for k in names)
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)  # onto the bare HF model
    load_adapter(Wrapper(), tmp_path)  # and onto another wrapper


def test_loading_onto_an_already_adapted_model_overwrites_deltas(tmp_path):
    model = trained()
    save_adapter(model, tmp_path)
    other = tiny_bert()
    apply_rocoft(other, RoCoFTConfig(rank=2, selection="random", seed=3, train_bias=True))
    load_adapter(other, tmp_path)
    torch.testing.assert_close(other(**inputs()).logits, model(**inputs()).logits, rtol=0, atol=0)


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def corrupt_truncate(path):
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:50])


def corrupt_json(path):
    (path / "adapter_config.json").write_text("{not json")


def resave(path, tensors):
    """Rewrite the weights and their checksum: a consistent adapter whose contents are wrong."""
    save_file(tensors, path / "adapter_model.safetensors")
    meta = json.loads((path / "adapter_config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
    (path / "adapter_config.json").write_text(json.dumps(meta))


def drop_key(path):
    t = load_file(path / "adapter_model.safetensors")
    t.pop("bert.encoder.layer.1.output.dense.delta")
    resave(path, t)


def add_key(path):
    t = load_file(path / "adapter_model.safetensors")
    t["surprise.delta"] = torch.zeros(1)
    resave(path, t)


def bad_delta_shape(path):
    t = load_file(path / "adapter_model.safetensors")
    t["bert.encoder.layer.0.attention.self.query.delta"] = torch.zeros(3, 16)
    resave(path, t)


def missing_file(path):
    (path / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize(
    "damage,match",
    [
        (corrupt_truncate, "corrupt"),
        (corrupt_json, "not valid JSON"),
        (drop_key, "missing keys"),
        (add_key, "unexpected keys"),
        (bad_delta_shape, "query: delta shape|query.*delta"),
        (missing_file, "missing"),
    ],
)
def test_damaged_adapters_fail_clearly_and_leave_the_model_unchanged(tmp_path, damage, match):
    save_adapter(trained(), tmp_path)
    damage(tmp_path)
    fresh = tiny_bert()
    before = state_of(fresh)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_adapter(fresh, tmp_path)
    after = state_of(fresh)
    assert before[1] == after[1]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_wrong_architecture_and_shape_mismatch(tmp_path):
    save_adapter(trained(), tmp_path)
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match="do not exist|trained on BertForSequenceClassification"):
        load_adapter(gpt2, tmp_path)
    assert not rocoft_layers(gpt2)
    wider = tiny_bert(hidden_size=32, intermediate_size=24)
    with pytest.raises(ValueError, match=r"adapter target .*stored shape \[16, 16\] != model shape \[32, 32\]"):
        load_adapter(wider, tmp_path)
    assert not rocoft_layers(wider)


def test_save_refuses_a_model_without_rocoft(tmp_path):
    with pytest.raises(ValueError, match="no RoCoFT layers"):
        save_adapter(tiny_bert(), tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merged_model_saves_the_same_adapter_as_the_unmerged_one(tmp_path, dtype):
    """merge_rocoft keeps the deltas (and a trained bias's float32 master, which the merge rounds to bf16)."""
    model = trained(mode="both").to(dtype)
    save_adapter(model, tmp_path / "unmerged")
    merge_rocoft(model)
    save_adapter(model, tmp_path / "merged")
    files = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("unmerged", "merged")]
    assert files[0] == files[1]
    unload_rocoft(model)
    with pytest.raises(ValueError, match="no RoCoFT layers"):
        save_adapter(model, tmp_path / "plain")


def test_merged_inside_a_holder_module_save_and_unmerge_work_on_the_holder(tmp_path):
    """As with a LightningModule: merge_rocoft on the inner model, save / unmerge called on the holder."""
    holder = torch.nn.Module()
    holder.model = tiny_bert()
    apply_rocoft(holder.model, RoCoFTConfig(rank=1))
    merge_rocoft(holder.model)
    save_adapter(holder, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert unmerge_rocoft(holder) is holder
    assert rocoft_layers(holder.model) and not any(l.merged for l in rocoft_layers(holder).values())


def test_both_adapter_holds_both_index_sets_and_deltas(tmp_path):
    model = trained(mode="both", rank=2)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    q = "bert.encoder.layer.0.attention.self.query"
    keys = {k for k in tensors if k.startswith(q + ".")}
    assert keys == {f"{q}.{k}" for k in ("delta", "indices", "delta_columns", "column_indices", "base.bias")}
    assert tensors[f"{q}.delta"].shape == (2, 16) and tensors[f"{q}.delta_columns"].shape == (16, 2)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"]["mode"] == "both"
    # 12 matrices of 2 x (in + out) - 2 x 2 each, plus biases and the head
    assert meta["report"]["rocoft_params"] == sum(2 * (l.in_features + l.out_features) - 4 for l in rocoft_layers(model).values())
    # loading onto a model adapted in another mode is refused; onto one adapted in 'both', it overwrites
    other = tiny_bert()
    apply_rocoft(other, RoCoFTConfig(rank=2, selection="random", seed=3, train_bias=True))
    with pytest.raises(ValueError, match=r"delta shape \(2, 16\), \(16, 2\) \(both\) != the model's RoCoFT layer \(2, 16\) \(row\)"):
        load_adapter(other, tmp_path)
    same = tiny_bert()
    apply_rocoft(same, RoCoFTConfig(mode="both", rank=2, seed=9, train_bias=True))
    load_adapter(same, tmp_path)
    assert index_lists(same) == index_lists(model)
    torch.testing.assert_close(same(**inputs()).logits, model(**inputs()).logits, rtol=0, atol=0)
