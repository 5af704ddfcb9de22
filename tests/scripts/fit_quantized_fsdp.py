"""RoCoFT on an NF4 base (double quantisation, bf16 compute, packed weights stored as bfloat16) under bf16-true:
one process, or FSDP2 (ModelParallelStrategy) over 2 gloo processes on the CPU.

    python tests/scripts/fit_quantized_fsdp.py NPROC OUT_DIR

The model is loaded quantized by CausalLMModule(quantization=...) in every process (no init_on_meta), then the
strategy shards it: with ``bnb_4bit_quant_storage=bfloat16`` the packed 4-bit weights are bf16 tensors that
FSDP2 shards like the rest. Writes OUT_DIR/run<NPROC>/adapter (rank 0, by the RoCoFT callback) and info.json
(rank 0: what the first layer's W0 and delta were while training).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "rocoft-test-hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fit_llm_distributed as fl  # noqa: E402
import tiny_causal_lm as tl  # noqa: E402
from rocoft_pl import RoCoFT, rocoft_layers  # noqa: E402
from rocoft_pl.modules.causal_lm import CausalLMModule  # noqa: E402

QUANTIZATION = dict(quantization="nf4-dq", quantization_options={"compute_dtype": "bfloat16", "quant_storage": "bfloat16"})


class Probe(pl.Callback):
    """What the first adapted layer's tensors are during training (sharded or not, their dtypes)."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.seen:
            layer = next(iter(rocoft_layers(pl_module).values()))
            weight = layer.base.weight
            self.seen = {"w0_type": type(weight).__name__, "w0_dtype": str(weight.dtype).replace("torch.", ""),
                         "base_class": type(layer.base).__name__, "delta_type": type(layer.delta).__name__,
                         "delta_dtype": str(layer.delta.dtype).replace("torch.", "")}


def main() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    nproc, out = int(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    base = out / "base"
    if not (base / "config.json").exists():
        tl.tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(base)
        tl.tiny_tokenizer().save_pretrained(base)
    run = out / f"run{nproc}"
    strategy = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) if nproc == 2 else dict(devices=1)
    module = CausalLMModule(str(base), learning_rate=2e-2, warmup_steps=0, adam_epsilon=1e-3, tokenizer=tl.tiny_tokenizer(),
                            model_kwargs={"dtype": "bfloat16"}, **QUANTIZATION)
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, callbacks=[RoCoFT(**fl.ROCOFT, adapter_dir=str(run / "adapter")), probe],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=run, precision="bf16-true", **strategy,
    )
    trainer.fit(module, datamodule=fl.datamodule(4 // nproc))  # the same global batch of 4 rows
    if trainer.is_global_zero:
        (run / "info.json").write_text(json.dumps({"world_size": trainer.world_size, **probe.seen}, indent=2))


if __name__ == "__main__":
    main()
