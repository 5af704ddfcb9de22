"""CausalLMModule + ReasoningDataModule + RoCoFT under 2-process FSDP2 (ModelParallelStrategy, gloo, CPU).

One subprocess launch (tests/scripts/fit_llm_distributed.py) runs two fits in the same 2 processes: FSDP2 with
the model built in __init__ (RoCoFT applied in Callback.setup, then fully_shard per decoder block in
configure_model), and FSDP2 with the parameters on the meta device (RoCoFT applied, sharded, then rank 0
loads the checkpoint and broadcasts the shards). Both must equal a single-process run on the same global
batches (length-grouped, 2 x 2 rows vs 4 rows; loss = mean over the global batch's response tokens), and
generate-and-parse evaluation must count every row once across the ranks. A third FSDP2 run trains under
bf16-true (W0 in bf16, the deltas and their AdamW moments float32 masters) and a fourth under FSDP2 mixed
precision (fp32 shards, bf16 compute), both against a bf16-true single process.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import dist_launch  # noqa: E402
import fit_llm_distributed as fl  # noqa: E402
import tiny_causal_lm as tl  # noqa: E402
from conftest import assert_adapters_close  # noqa: E402
from rocoft_pl import load_adapter, rocoft_layers  # noqa: E402

RUNS = ["fsdp2", "fsdp2-meta", "fsdp2-bf16", "fsdp2-mp"]


def reference(run: str) -> str:
    """bf16-true and FSDP2 mixed precision (bf16 compute) against the bf16-true single process."""
    return "single-bf16" if "bf16" in run or "mp" in run else "single"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_llm")
    fl.save_base(out)
    dist_launch.run_script(SCRIPTS / "fit_llm_distributed.py", ",".join(RUNS), out, timeout=300)
    fl.fit("single", out / "single", out / "base")  # the references, in this process
    fl.fit("single", out / "single-bf16", out / "base", precision="bf16-true")
    return out


def tensors(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def info(run_dir: Path) -> dict:
    return json.loads((run_dir / "info.json").read_text())


@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_adapter_equals_single_process(out, run):
    got, ref = tensors(out / run), tensors(out / reference(run))
    deltas = [k for k in ref if k.endswith(".delta")]
    assert len(deltas) == 14 and all(ref[k].abs().sum() > 0 for k in deltas)
    assert all(got[k].dtype == torch.float32 for k in deltas)
    # bf16: the forward in bf16 over 2 x 2 rows vs 4 rows rounds differently (seen: 3e-3 of the largest delta);
    # mp: fp32 W0 cast to bf16 per gathered block vs a bf16 W0 (seen: 8e-3)
    assert_adapters_close(got, ref, tol={"bf16": 1e-2, "mp": 3e-2}.get(run.split("-")[-1], 1e-5))
    meta = json.loads((out / run / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"]["architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize("run", RUNS)
def test_really_sharded_and_evaluated_across_ranks(out, run):
    got, ref = info(out / run), info(out / reference(run))
    assert (got["world_size"], got["strategy"], got["global_step"]) == (2, "ModelParallelStrategy", 3)
    assert got["delta_was_dtensor"] is True and ref["delta_was_dtensor"] is False
    # each rank generated for 1 of the 2 rows per dataset; the counts are summed over ranks
    assert got["metrics"]["val/boolq/count"] == got["metrics"]["val/gsm8k/count"] == 2
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value), key


@pytest.mark.parametrize("run", RUNS)
def test_trained_tensors_are_float32_masters_next_to_a_bf16_w0(out, run):
    """Under bf16-true Lightning converts the whole model to bf16; the deltas and AdamW's moments stay float32."""
    w0 = "torch.bfloat16" if "bf16" in run else "torch.float32"  # mp: fp32 shards, bf16 only when gathered
    assert info(out / run)["dtypes"] == {"delta": ["torch.float32"], "w0": [w0], "adam_state": ["torch.float32"]}


def test_adapter_from_fsdp2_loads_onto_the_base_model(out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    load_adapter(model, out / "fsdp2" / "adapter")
    assert len(rocoft_layers(model)) == 14
    ids = torch.tensor([tl.tiny_tokenizer()("the correct answer is")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)


CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_13b", "bloomz_7b", "gptj_6b", "llama2_7b_nf4", "llama2_13b_nf4"])
def test_fsdp_overlays_build_their_strategies(name):
    """The overlays instantiate: FSDP2 (ModelParallelStrategy) over every GPU, the model built on the meta device
    (the NF4 ones: loaded quantized in every process, tests/test_quantized.py)."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    spec = yaml.safe_load((CONFIGS / "fsdp" / f"{name}.yaml").read_text())
    strategy = parser.instantiate(parser.parse_object({"strategy": spec["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, ModelParallelStrategy) and spec["trainer"]["precision"] == "bf16-true"
    assert strategy._data_parallel_size == spec["trainer"]["devices"]
    assert spec["model"]["init_args"]["init_on_meta"] is (not name.endswith("_nf4"))
    assert strategy._save_distributed_checkpoint is False  # adapter-only checkpoints resume from one full file


def test_block_classes_to_shard():
    from rocoft_pl.modules.causal_lm import block_class_names

    assert block_class_names(tl.tiny_llama()) == {"LlamaDecoderLayer"}
    assert block_class_names(tl.tiny_gpt2()) == {"GPT2Block"}


def test_adapter_diff_command(out, capsys):
    from benchmark.cli import main

    assert main(["adapter-diff", str(out / "fsdp2" / "adapter"), str(out / "single" / "adapter")]) == 0
    assert "same indices" in capsys.readouterr().out
    # bf16 vs fp32 training: the same rows, deltas apart by far more than 1e-5 of their size
    assert main(["adapter-diff", str(out / "single-bf16" / "adapter"), str(out / "single" / "adapter")]) == 1
    assert "NOT within --tol 1e-05" in capsys.readouterr().out
