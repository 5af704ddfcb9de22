"""CausalLMModule + ReasoningDataModule + RoCoFT under 2-process FSDP2 (ModelParallelStrategy, gloo, CPU).

One subprocess launch (tests/scripts/fit_llm_distributed.py) runs two fits in the same 2 processes: FSDP2 with
the model built in __init__ (RoCoFT applied in Callback.setup, then fully_shard per decoder block in
configure_model), and FSDP2 with the parameters on the meta device (RoCoFT applied, sharded, then rank 0
loads the checkpoint and broadcasts the shards). Both must equal a single-process run on the same global
batches (length-grouped, 2 x 2 rows vs 4 rows; loss = mean over the global batch's response tokens), and
generate-and-parse evaluation must count every row once across the ranks.
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

RUNS = ["fsdp2", "fsdp2-meta"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_llm")
    fl.save_base(out)
    dist_launch.run_script(SCRIPTS / "fit_llm_distributed.py", ",".join(RUNS), out, timeout=300)
    fl.fit("single", out / "single", out / "base")  # the reference, in this process
    return out


def tensors(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def info(run_dir: Path) -> dict:
    return json.loads((run_dir / "info.json").read_text())


@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_adapter_equals_single_process(out, run):
    got, ref = tensors(out / run), tensors(out / "single")
    deltas = [k for k in ref if k.endswith(".delta")]
    assert len(deltas) == 14 and all(ref[k].abs().sum() > 0 for k in deltas)
    assert_adapters_close(got, ref)
    meta = json.loads((out / run / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"]["architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize("run", RUNS)
def test_really_sharded_and_evaluated_across_ranks(out, run):
    got, ref = info(out / run), info(out / "single")
    assert (got["world_size"], got["strategy"], got["global_step"]) == (2, "ModelParallelStrategy", 3)
    assert got["delta_was_dtensor"] is True and ref["delta_was_dtensor"] is False
    # each rank generated for 1 of the 2 rows per dataset; the counts are summed over ranks
    assert got["metrics"]["val/boolq/count"] == got["metrics"]["val/gsm8k/count"] == 2
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value), key


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


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_13b", "bloomz_7b", "gptj_6b"])
def test_fsdp_overlays_build_their_strategies(name):
    """The overlays instantiate (class paths of the block classes become a ModuleWrapPolicy); the GPU-only
    part (FSDPStrategy refuses CPU at setup) is not run here."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    for suffix, cls in (("", FSDPStrategy), ("_fsdp2", ModelParallelStrategy)):
        spec = yaml.safe_load((CONFIGS / "fsdp" / f"{name}{suffix}.yaml").read_text())
        strategy = parser.instantiate(parser.parse_object({"strategy": spec["trainer"]["strategy"]})).strategy
        assert isinstance(strategy, cls) and spec["trainer"]["precision"] == "bf16-true"
        if cls is FSDPStrategy:
            policy = strategy.kwargs["auto_wrap_policy"]
            assert {c.__name__ for c in policy._module_classes} == {
                "llama2_7b": {"LlamaDecoderLayer"}, "llama2_13b": {"LlamaDecoderLayer"}, "bloomz_7b": {"BloomBlock"},
                "gptj_6b": {"GPTJBlock"},
            }[name]
            assert strategy._state_dict_type == "sharded" and "auto_wrap_policy" in strategy._activation_checkpointing_kwargs
        else:
            assert spec["model"]["init_args"]["init_on_meta"] is True


def test_block_classes_to_shard():
    from rocoft_pl.modules.causal_lm import block_class_names

    assert block_class_names(tl.tiny_llama()) == {"LlamaDecoderLayer"}
    assert block_class_names(tl.tiny_gpt2()) == {"GPT2Block"}
