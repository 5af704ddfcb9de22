"""export_lora / `rocoft export-lora`: a RoCoFT adapter as the exact PEFT LoRA it is, and vLLM's loader rules."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_bert, tiny_gpt2, trained
from safetensors.torch import load_file

from rocoft_pl import RoCoFTConfig, apply_rocoft, export_lora, merge_rocoft, rocoft_layers, save_adapter, unload_rocoft
from rocoft_pl.export import (
    EXPORT_RECORD,
    VLLM_MAX_LORA_RANKS,
    lora_factors,
    vllm_problems,
)

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_causal_lm import tiny_llama  # noqa: E402

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "tests" / "fixtures" / "text_classification" / "tiny_bert")
VLLM_KEY = r"^base_model\.model\.[\w.]+\.lora_[AB]\.weight$"  # what vLLM's parse_fine_tuned_lora_name accepts


def small_llama():
    return tiny_llama(vocab_size=64)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_model(base, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base.eval(), str(path)).eval()


def check_exact(model, make_base, path, ids):
    """PEFT's model gives the RoCoFT model's outputs, and its merge_and_unload equals merge_rocoft."""
    peft = peft_model(make_base(), path)
    torch.testing.assert_close(logits(peft, ids), logits(model, ids), rtol=0, atol=1e-5)
    merged = peft.merge_and_unload().state_dict()
    ours = unload_rocoft(merge_rocoft(model)).state_dict()
    assert merged.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(merged[key], ours[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2, small_llama], ids=["linear", "conv1d", "llama"])
@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_factors_reproduce_each_delta_bit_for_bit(make, mode):
    model = trained(make, mode=mode)
    for name, layer in rocoft_layers(model).items():
        parts = {**{k: v.detach() for k, v in layer.deltas.items()}, **layer.index_sets}
        a, b = lora_factors(mode, (layer.out_features, layer.in_features), parts)
        r = 2 * layer.indices.numel() if mode == "both" else layer.indices.numel()
        assert a.shape == (r, layer.in_features) and b.shape == (layer.out_features, r), name
        assert torch.equal(b @ a, layer.delta_weight().detach()), name


@pytest.mark.parametrize("mode", ["row", "column"])
def test_bert_classifier_with_its_head_in_modules_to_save(tmp_path, mode):
    model = trained(tiny_bert, mode=mode, train_bias=False)
    save_adapter(model, tmp_path / "adapter")
    result = export_lora(tmp_path / "adapter", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 2
    assert config["modules_to_save"] == ["classifier"] and config["fan_in_fan_out"] is False
    assert config["lora_bias"] is False and not config["use_rslora"]
    assert config["target_modules"] == sorted(rocoft_layers(model)) and result.targets == 12
    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    peft = peft_model(tiny_bert(), tmp_path / "lora")
    assert sum(1 for n, _ in peft.named_modules() if n.endswith(".lora_A")) == 12
    check_exact(model, tiny_bert, tmp_path / "lora", batch()["input_ids"])


@pytest.mark.parametrize("mode", ["row", "column"])
def test_gpt2_conv1d_lm_with_trained_biases_from_the_base_checkpoint(tmp_path, mode):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    model = trained(tiny_gpt2, mode=mode, train_bias=True)
    save_adapter(model, tmp_path / "adapter")
    result = export_lora(tmp_path / "adapter", tmp_path / "lora", base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is True and result.lora_bias
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["task_type"] == "CAUSAL_LM"
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    # PEFT stores A and B as for a Linear (r x in, out x r); the transpose is applied to their product
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 16)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (48, 2)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"].shape == (48,)
    check_exact(model, tiny_gpt2, tmp_path / "lora", batch()["input_ids"])


@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_llama_lm_from_memory_and_from_disk_alike(tmp_path, mode):
    model = trained(small_llama, mode=mode)
    save_adapter(model, tmp_path / "adapter")
    from_disk = export_lora(tmp_path / "adapter", tmp_path / "lora")
    export_lora(model, tmp_path / "lora-memory")
    a = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    b = load_file(tmp_path / "lora-memory" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_disk.r == (4 if mode == "both" else 2) and from_disk.dtype == "float32"
    assert from_disk.vllm_problems == [] and from_disk.vllm_max_lora_rank == 8
    check_exact(model, small_llama, tmp_path / "lora", batch()["input_ids"])


def test_trained_biases_from_a_base_model_in_memory(tmp_path):
    model = trained(tiny_bert, mode="row", train_bias=True)
    with pytest.raises(ValueError, match="differs from the model the adapter was trained on"):
        export_lora(model, tmp_path / "lora", base_model=tiny_bert(intermediate_size=32))
    export_lora(model, tmp_path / "lora", base_model=tiny_bert())
    check_exact(model, tiny_bert, tmp_path / "lora", batch()["input_ids"])


def test_base_biases_from_a_torch_checkpoint_without_the_model_prefix(tmp_path):
    # a checkpoint of the bare encoder (BertModel: no "bert." prefix), saved with torch.save
    model = trained(tiny_bert, mode="column", train_bias=True)
    (tmp_path / "base").mkdir()
    torch.save(tiny_bert().bert.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    export_lora(model, tmp_path / "lora", base_model=str(tmp_path / "base"))
    check_exact(model, tiny_bert, tmp_path / "lora", batch()["input_ids"])


def test_deltas_dtype_by_default_and_a_dtype_on_request(tmp_path):
    model = small_llama().to(torch.bfloat16)
    apply_rocoft(model, RoCoFTConfig(rank=2, selection="random"))
    assert next(iter(rocoft_layers(model).values())).delta.dtype == torch.float32  # the master copy
    assert export_lora(model, tmp_path / "fp32").dtype == "float32"
    result = export_lora(model, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert result.dtype == "bfloat16" and all(t.dtype == torch.bfloat16 for t in tensors.values())
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert set(b.unique().tolist()) == {0.0, 1.0} and b.sum() == 2  # the selector survives any dtype


# -- refusals: clear errors, nothing written -----------------------------------------------------------------


def test_entries_mode_is_refused_saying_why(tmp_path):
    model = trained(tiny_bert, mode="entries", selection="random", p=0.1, train_bias=False)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="not low-rank"):
        export_lora(tmp_path / "adapter", tmp_path / "lora")
    with pytest.raises(ValueError, match="not low-rank"):
        export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_refuse_bias_and_a_missing_base(tmp_path):
    model = trained(tiny_gpt2, mode="row", train_bias=True)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="lora_B.bias, which vLLM does not load"):
        export_lora(tmp_path / "adapter", tmp_path / "lora", refuse_bias=True)
    with pytest.raises(ValueError, match="records no base model name: pass base_model"):
        export_lora(tmp_path / "adapter", tmp_path / "lora")
    with pytest.raises(ValueError, match="not one with RoCoFT layers"):
        export_lora(tmp_path / "adapter", tmp_path / "lora", base_model=model)
    with pytest.raises(FileNotFoundError, match="cannot find the base model"):
        export_lora(tmp_path / "adapter", tmp_path / "lora", base_model=str(tmp_path / "nowhere"))
    assert not (tmp_path / "lora").exists()
    # without trained biases nothing of the base is needed
    export_lora(trained(tiny_gpt2, train_bias=False), tmp_path / "plain")


def test_sources_that_are_not_rocoft_adapters(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter file missing"):
        export_lora(tmp_path / "empty", tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        export_lora(tmp_path / "absent", tmp_path / "lora")
    export_lora(trained(small_llama), tmp_path / "lora1")
    with pytest.raises(ValueError, match="already a LoRA export"):
        export_lora(tmp_path / "lora1", tmp_path / "lora2")
    (tmp_path / "lora1" / EXPORT_RECORD).unlink()  # a plain PEFT directory
    with pytest.raises(ValueError, match="not a rocoft_pl adapter config"):
        export_lora(tmp_path / "lora1", tmp_path / "lora2")
    with pytest.raises(ValueError, match="no RoCoFT layers"):
        export_lora(tiny_bert(), tmp_path / "lora2")
    assert not (tmp_path / "lora2").exists()


def test_out_dir_new_empty_or_an_earlier_export_else_refused(tmp_path):
    model = trained(small_llama, train_bias=False)
    save_adapter(model, tmp_path / "adapter")
    for inside in ("adapter", "adapter/lora"):
        with pytest.raises(ValueError, match="is the RoCoFT adapter directory or inside it"):
            export_lora(tmp_path / "adapter", tmp_path / inside)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier export"):
        export_lora(tmp_path / "adapter", tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="holds a RoCoFT adapter"):
        export_lora(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    export_lora(tmp_path / "adapter", tmp_path / "empty")
    before = load_file(tmp_path / "empty" / "adapter_model.safetensors")
    with torch.no_grad():
        next(iter(rocoft_layers(model).values())).delta.add_(1.0)
    export_lora(model, tmp_path / "empty")  # an earlier export: replaced as a whole
    after = load_file(tmp_path / "empty" / "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


# -- vLLM's documented loader rules (vLLM cannot run here) -----------------------------------------------------


def test_vllm_rules_on_the_exported_files(tmp_path):
    import re

    llama = export_lora(trained(small_llama, mode="row"), tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
    keys = list(load_file(tmp_path / "llama" / "adapter_model.safetensors"))
    accepted = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # vLLM's Llama LoRA modules
    assert all(re.match(VLLM_KEY, k) for k in keys) and {k.split(".")[-3] for k in keys} <= accepted
    assert not config["modules_to_save"] and config["bias"] == "none" and not config["use_dora"]
    assert config["r"] <= 16 and llama.vllm_problems == []  # fits vLLM's default --max-lora-rank 16
    assert "--enable-lora --lora-modules llama=" in llama.vllm_command() and "--max-lora-rank 8" in llama.vllm_command()
    assert vllm_problems(tmp_path / "llama", max_lora_rank=12) == [
        f"--max-lora-rank 12 is not one of vLLM's choices {VLLM_MAX_LORA_RANKS}"
    ]

    big = export_lora(trained(small_llama, mode="both", rank=5), tmp_path / "big")  # LoRA r = 10
    assert big.vllm_max_lora_rank == 16 and big.vllm_problems == []
    assert vllm_problems(tmp_path / "big", max_lora_rank=8) == ["LoRA rank 10 is greater than max_lora_rank 8"]

    bert = export_lora(trained(tiny_bert, train_bias=True), tmp_path / "bert", base_model=tiny_bert())
    assert any("modules_to_save" in p for p in bert.vllm_problems)
    assert any("lora_B.bias" in p for p in bert.vllm_problems)
    gpt2 = export_lora(trained(tiny_gpt2, train_bias=False), tmp_path / "gpt2")
    assert gpt2.vllm_problems == ["vLLM's GPT2LMHeadModel does not support LoRA"]


# -- `rocoft export-lora` ------------------------------------------------------------------------------------


def test_cli_prints_what_it_wrote_and_the_vllm_command(tmp_path, capsys):
    from rocoft_pl.cli import main

    save_adapter(trained(small_llama, mode="column", train_bias=False), tmp_path / "adapter")
    main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "lora")])
    out = capsys.readouterr().out
    assert "LoRA r=2" in out and "14 target modules" in out and "lora_bias: no" in out
    assert f"--enable-lora --lora-modules lora={tmp_path / 'lora'} --max-lora-rank 8" in out
    assert "not run" in out and "no problem found" in out


def test_cli_reads_the_recorded_base_for_biases_and_refuses_on_request(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from rocoft_pl.cli import main

    model = AutoModelForSequenceClassification.from_pretrained(TINY)
    apply_rocoft(model, RoCoFTConfig(rank=1, train_bias=True))
    save_adapter(model, tmp_path / "adapter")
    main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "lora")])  # b0 from the recorded TINY
    out = capsys.readouterr().out
    assert "lora_bias: yes" in out and "vLLM does not load it" in out and f"vllm serve {TINY}" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "other"), "--refuse-bias"])
    assert exit_info.value.code == 1
    assert "rocoft: error: the adapter trained the biases" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_cli_entries_mode_is_one_error_line(tmp_path, capsys):
    from rocoft_pl.cli import main

    save_adapter(trained(tiny_bert, mode="entries", selection="random", train_bias=False), tmp_path / "adapter")
    with pytest.raises(SystemExit) as exit_info:
        main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "lora")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("rocoft: error: mode 'entries' is not low-rank")
    assert not (tmp_path / "lora").exists()
