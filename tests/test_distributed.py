"""The RoCoFT callback under 2-process DDP and FSDP2 (ModelParallelStrategy) on CPU with gloo.

One subprocess launch (tests/scripts/fit_distributed.py) fits a tiny Llama six times in the same 2
processes: FSDP2, DDP, DDP with the backbone built in configure_model, FSDP2 and DDP with Wanda selection
calibrated on per-rank data, and FSDP2 with the backbone built *and sharded* in configure_model (which
RoCoFT must refuse). The seeded runs must equal a single-process run on the same global batches
(2 x the per-rank batch, same rows, same seeds); the Wanda runs must agree across ranks and strategies.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_adapters_close
from rocoft_pl import load_adapter, rocoft_layers

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import fit_distributed as fd  # noqa: E402

# fsdp2 first: ModelParallelStrategy itself starts the processes and the gloo process group
RUNS = ["fsdp2", "ddp", "ddp-lazy", "fsdp2-wanda", "ddp-wanda", "fsdp2-lazy"]
TRAINED = ["fsdp2", "ddp", "ddp-lazy"]
DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "RANK",
            "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("PL_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(SCRIPTS.parents[1]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "fit_distributed.py"), ",".join(RUNS), str(out)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, the full global batch (2 x 2 rows) per step."""
    out = tmp_path_factory.mktemp("single")
    fd.fit("single", out, batch=4)
    return out


def info(run_dir: Path) -> dict:
    return json.loads((run_dir / "info.json").read_text())


def tensors(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_runs_really_were_distributed_on_the_same_global_batches(distributed, single):
    ref = info(single)
    assert ref["world_size"] == 1 and ref["global_step"] == 3
    for run, strategy in (("fsdp2", "ModelParallelStrategy"), ("ddp", "DDPStrategy"), ("ddp-lazy", "DDPStrategy")):
        got = info(distributed / run)
        assert (got["world_size"], got["strategy"], got["global_step"]) == (2, strategy, 3)
        # rank 0 saw the even rows of each global batch; the reference saw all of them
        assert got["first_tokens"] == [rows[0::2] for rows in ref["first_tokens"]]
        # FSDP2 really sharded the RoCoFT deltas (DTensors during training); DDP kept plain tensors
        assert got["delta_was_dtensor"] is (run == "fsdp2")


@pytest.mark.parametrize("run", TRAINED)
def test_adapter_equals_single_process_run(distributed, single, run):
    got, ref = tensors(distributed / run), tensors(single)
    deltas = [k for k in ref if k.endswith(".delta")]
    assert len(deltas) == 14  # 7 Linear layers x 2 blocks
    assert any(k.endswith(".base.bias") for k in ref) and "lm_head.weight" in ref  # biases and head gathered too
    assert_adapters_close(got, ref)
    assert all(got[k].abs().sum() > 0 for k in deltas)
    config = json.loads((distributed / run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model"]["architecture"] == "LlamaForCausalLM"  # not FSDP2's FSDPLlamaForCausalLM


@pytest.mark.parametrize("run", TRAINED)
def test_adapter_loads_onto_a_fresh_model(distributed, single, run):
    fresh, reference = fd.tiny_llama().eval(), fd.tiny_llama().eval()
    load_adapter(fresh, distributed / run / "adapter")
    load_adapter(reference, single / "adapter")
    layers = rocoft_layers(fresh)
    assert len(layers) == 14 and all(l.delta.abs().sum() > 0 for l in layers.values())
    ids = torch.stack(fd.token_rows()[:4])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(fresh(input_ids=ids).logits, fd.tiny_llama().eval()(input_ids=ids).logits)


@pytest.mark.parametrize("run", TRAINED + ["fsdp2-wanda", "ddp-wanda"])
def test_every_rank_trained_the_indices_the_adapter_holds(distributed, run):
    ranks = [json.loads((distributed / run / f"indices.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    saved = tensors(distributed / run)
    assert {k.removeprefix("model."): v for k, v in ranks[0].items()} == {
        k.removesuffix(".indices"): v.tolist() for k, v in saved.items() if k.endswith(".indices")
    }


def test_wanda_under_fsdp2_uses_rank_zero_indices_like_ddp(distributed):
    """Each rank calibrates on its own rows, so Wanda may pick other rows per rank; the callback broadcasts
    rank 0's choice (DDP would broadcast the buffers anyway, FSDP2 would not): both then train the same."""
    fsdp2, ddp = tensors(distributed / "fsdp2-wanda"), tensors(distributed / "ddp-wanda")
    assert fsdp2.keys() == ddp.keys()
    for key in ddp:
        scale = ddp[key].double().abs().max().item()
        torch.testing.assert_close(fsdp2[key], ddp[key], rtol=1e-5, atol=1e-5 * scale, msg=key)
    seeded = tensors(distributed / "ddp")
    assert any(not torch.equal(ddp[k], seeded[k]) for k in ddp if k.endswith(".indices"))  # Wanda chose its own


def test_fsdp2_backbone_sharded_in_configure_model_is_refused_on_every_rank(distributed):
    run = distributed / "fsdp2-lazy"
    assert not (run / "adapter").exists()
    for rank in (0, 1):
        message = (run / f"error.rank{rank}.txt").read_text()
        assert message.startswith("RuntimeError: RoCoFT:") and "already sharded" in message
        assert "__init__" in message  # says how to fix it


def test_lazy_backbone_single_process_equals_eager(single, tmp_path):
    fd.fit("single", tmp_path, batch=4, lazy=True)
    got, ref = tensors(tmp_path), tensors(single)
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
