"""benchmark.memory: bytes per parameter measured on a real step, the FSDP memory arithmetic, `rocoft-bench memory`."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import tiny_causal_lm as tl  # noqa: E402


@pytest.mark.parametrize("dtype, frozen, trained", [(torch.float32, 4, 16), (torch.bfloat16, 2, 16)])
def test_measured_bytes_per_parameter(dtype, frozen, trained):
    """After a real RoCoFT step: frozen weights hold no gradient and no optimizer state; a trained parameter
    holds itself, its gradient and AdamW's two moments, in float32 also next to a bf16 W0 (the master deltas;
    the constants fsdp_memory_per_gpu uses)."""
    from rocoft_pl import RoCoFTConfig, apply_rocoft
    from benchmark.memory import BYTES, measured_bytes_per_param

    model = tl.tiny_llama().to(dtype)
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(2, 400, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = measured_bytes_per_param(model, opt)
    assert measured == {"frozen": frozen, "trained": trained}
    key = "fp32" if dtype == torch.float32 else "bf16-true"
    assert BYTES[key]["trained"] == trained and BYTES[key]["frozen"] == frozen


def test_rocoft_counts_of_llama2_7b_and_fsdp_memory():
    from benchmark.memory import LLM_CONFIGS, fsdp_memory_per_gpu, meta_model, rocoft_count

    kind, cfg = LLM_CONFIGS["LLaMA-2-7B"]
    model = meta_model(kind, **cfg)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert rocoft_count(model, "column", 3) == 4_079_616  # DESIGN.md: 3 columns of every block Linear
    assert rocoft_count(model, "row", 3) == 32 * 3 * (4 * 4096 + 2 * 4096 + 11008)
    common = dict(total_params=6_738_415_616, trained_params=3_416_064, block_params=202_383_360, num_layers=32,
                  hidden_size=4096, vocab_size=32000)
    one, eight = fsdp_memory_per_gpu(num_gpus=1, **common), fsdp_memory_per_gpu(num_gpus=8, **common)
    assert one["states"] == pytest.approx((6_738_415_616 * 2 + 3_416_064 * 14) / 2**30)  # bf16 W0 + fp32 deltas: 16 B each
    assert eight["states"] == pytest.approx(one["states"] / 8)
    assert eight["gathered"] == one["gathered"] and eight["total"] < one["total"]
    full = fsdp_memory_per_gpu(num_gpus=8, **{**common, "trained_params": 6_738_415_616}, precision="fp32-master")
    assert full["states"] == pytest.approx(6_738_415_616 * 16 / 8 / 2**30)
    with pytest.raises(ValueError):
        fsdp_memory_per_gpu(num_gpus=1, precision="fp8", **common)


def test_memory_command_prints_the_table(capsys):
    from benchmark.cli import main

    assert main(["memory", "--gpus", "1,8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| LLaMA-2-7B")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].split("|")]
    assert cells[2:5] == ["6.74B", "3,416,064", "8"]
    rocoft, full = float(cells[5].split()[0]), float(cells[6])
    assert 0 < rocoft < full / 3  # sharded states + activations: RoCoFT far below full fine-tuning
