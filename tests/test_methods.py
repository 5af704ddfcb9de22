"""The benchmark's method registry: every method trains a tiny model and counts parameters the same way."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyClassifier, tiny_bert, tiny_loader

from benchmark.methods import METHODS, ROCOFT_METHODS, counts_of, method_callback, target_suffixes
from rocoft_pl import rocoft_layers


Classifier = TinyClassifier
data = tiny_loader


HEAD = 16 * 2 + 2  # tiny_bert's classifier: hidden 16 -> 2 labels


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_counts_head_separately(method):
    params = {"rank": 1} if method in ("rocoft-row", "rocoft-column", "rocoft-both") else {}
    module, cb = Classifier(), method_callback(method, **params)
    pl.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, accelerator="cpu").fit(module, data())
    counts = counts_of(cb, module)
    # rocoft-both stores the r x r overlap of its row and column deltas twice and counts it once
    overlap = sum(l.num_stored - l.num_trainable for l in rocoft_layers(module).values())
    assert (overlap > 0) == (method == "rocoft-both")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert counts.trainable_params == trainable - overlap
    assert counts.head_params == HEAD
    assert counts.adapter_params > 0


def test_counts_are_the_methods_own():
    counts = {}
    for method, params in [("rocoft-row", {"rank": 1}), ("rocoft-both", {"rank": 1}), ("bitfit", {}), ("full", {}), ("lora", {"r": 8})]:
        module, cb = Classifier(), method_callback(method, **params)
        cb.setup(pl.Trainer(max_steps=1, logger=False), module, "fit")
        counts[method] = counts_of(cb, module).adapter_params
    # RoCoFT 1-row: in_features per matrix; 2 layers x (4 x 16 + 16 + 24).
    assert counts["rocoft-row"] == 2 * (4 * 16 + 16 + 24)
    # 1 row and 1 column: in + out - 1 per matrix, the shared entry once
    assert counts["rocoft-both"] == 2 * (4 * (16 + 16 - 1) + (16 + 24 - 1) + (24 + 16 - 1))
    biases = sum(p.numel() for n, p in tiny_bert().named_parameters() if n.endswith("bias") and not n.startswith("classifier"))
    assert counts["bitfit"] == biases
    assert counts["full"] == sum(p.numel() for n, p in tiny_bert().named_parameters() if not n.startswith("classifier"))
    # LoRA r=8 on the same 12 matrices: r * (in + out) each.
    assert counts["lora"] == 2 * 8 * (4 * (16 + 16) + (16 + 24) + (24 + 16))


def test_same_targets_restrict_rocoft_and_lora_alike():
    """Table 8 adapts only the attention's query/key/value: both methods take the same suffix list."""
    qkv = ["query", "key", "value"]
    counts = {}
    for method, params in [("rocoft-row", {"rank": 2, "targets": qkv}), ("lora", {"r": 2, "targets": qkv})]:
        module, cb = Classifier(), method_callback(method, **params)
        cb.setup(pl.Trainer(max_steps=1, logger=False), module, "fit")
        counts[method] = counts_of(cb, module).adapter_params
    assert counts["rocoft-row"] == 2 * 3 * 2 * 16  # 2 layers x 3 matrices x 2 rows x 16 inputs
    assert counts["lora"] == 2 * 3 * 2 * (16 + 16)


def test_peft_targets_are_rocofts_targets():
    assert target_suffixes(tiny_bert()) == [
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense",
    ]


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        method_callback("dora")


def test_rocoft_both_is_a_registry_method_with_rocoft_rows_params():
    assert "rocoft-both" in ROCOFT_METHODS and "rocoft-both" in METHODS
    cb = method_callback("rocoft-both", rank=2, selection="random", seed=3, train_bias=True, targets=["query"])
    assert cb.config.mode == "both" and cb.config.rank == 2 and cb.config.selection == "random"
    with pytest.raises(TypeError):
        method_callback("rocoft-both", r=2)  # a LoRA param, not RoCoFT's


def test_a_grid_can_use_rocoft_both(tmp_path):
    import yaml

    from benchmark.faults import TINY_BASE
    from benchmark.grid import load_grid
    from benchmark.validate import method_problems

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    grid = {
        "name": "tiny", "base_config": str(tmp_path / "base.yaml"), "seeds": [1],
        "models": {"tiny-bert": {}}, "tasks": {"tweets": {}},
        "methods": {"both-r2": {"method": "rocoft-both", "params": {"rank": 2}, "label": "RoCoFT 2-Both"}},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    cells = load_grid(tmp_path / "grid.yaml").cells
    assert [(c.method, c.method_params) for c in cells] == [("rocoft-both", {"rank": 2})]
    assert method_problems(cells[0]) is None
