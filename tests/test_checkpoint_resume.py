"""LLM checkpoints during training: adapter-only Lightning checkpoints every N steps, and a resume that reproduces
the uninterrupted run's adapter exactly (deltas, trained biases, AdamW moments, warm-up + cosine schedule, and
the length-grouped batch order, mid-epoch included), in one process and with FSDP2 (2 gloo processes; this file
is also the script they run). Also the three LLM configs' checkpoint settings."""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # run as a script: no conftest
    os.environ.setdefault(_var, "1")

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dist_launch  # noqa: E402
import tiny_causal_lm as tl  # noqa: E402
from rocoft_pl import RoCoFT, rocoft_layers  # noqa: E402
from rocoft_pl.modules.causal_lm import CausalLMModule  # noqa: E402
from tasks.reasoning import LengthGroupedSampler, ReasoningDataModule  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "reasoning"
# 15 training rows in batches of 2: 8 batches (4 optimizer steps under accumulation 2) per epoch, so a run of
# 6 steps crosses an epoch boundary and a checkpoint at step 3 is mid-epoch.
TRAIN = ["commonsense_170k", "math_10k", "boolq", "gsm8k", "piqa"]
STEPS, ACCUMULATE = 6, 2


def datamodule() -> ReasoningDataModule:
    dm = ReasoningDataModule("unused", train_datasets=TRAIN, eval_datasets=["boolq"], batch_size=2, max_length=160,
                             data_files={**tl.DATASET_FILES, **tl.MERGED_FILES}, mega_batch_factor=2)
    dm.tokenizer = tl.tiny_tokenizer()
    return dm


def module() -> CausalLMModule:
    """A Llama with biases (the configs train them) and enough frozen weight that its size shows."""
    model = tl.tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                          attention_bias=True, mlp_bias=True)
    return CausalLMModule(model=model, tokenizer=tl.tiny_tokenizer(), learning_rate=2e-2, warmup_steps=2,
                          scheduler="cosine", max_new_tokens=2)


class Batches(pl.Callback):
    """Records (epoch, step, token-id sum of each row) of every training batch: which rows a run trained on."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, trainer.global_step, batch["input_ids"].sum(1).tolist()))


def fit(root: Path, ckpt_path=None) -> tuple[CausalLMModule, Batches]:
    """The configs' setup in small: RoCoFT rows with trained biases, adapter-only checkpoints every step (all
    kept, so any step can be resumed from), AdamW with warm-up and cosine decay, gradient accumulation."""
    m, batches = module(), Batches()
    rocoft = RoCoFT(mode="row", rank=2, selection="random", train_bias=True, adapter_only_checkpoint=True,
                    adapter_dir=str(root / "adapter"))
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, logger=False,
                         callbacks=[rocoft, checkpoints, batches], enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root)
    trainer.fit(m, datamodule=datamodule(), ckpt_path=ckpt_path)
    return m, batches


def step_checkpoint(root: Path, step: int) -> Path:
    (path,) = (root / "checkpoints").glob(f"*-step={step}.ckpt")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    m, batches = fit(root)
    return root, m, batches


def test_checkpoints_hold_only_the_trained_tensors_and_indices(uninterrupted):
    root, m, _ = uninterrupted
    path = step_checkpoint(root, 3)
    ckpt = torch.load(path, weights_only=True)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    indices = {f"{n}.adapters.default.indices" for n in rocoft_layers(m)}
    assert set(ckpt["state_dict"]) == trained | indices
    assert trained == {n for n in trained if n.endswith((".delta", ".base.bias"))}  # deltas and trained biases
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert not frozen & set(ckpt["state_dict"]) and any(n.endswith("base.weight") for n in frozen)
    # everything a resume needs is there: AdamW moments of the trained tensors, the schedule, the batch position
    assert len(ckpt["optimizer_states"][0]["state"]) == len(trained)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 3
    assert ckpt["ReasoningDataModule"] == {"epoch": 0, "batches": 6, "global_batch": 2}
    model_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    assert path.stat().st_size < model_bytes / 5
    assert (root / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "chain",
    [(3,), (4,), (1, 3)],
    ids=["mid-epoch", "end-of-epoch", "twice-in-one-epoch"],
)
def test_resume_reproduces_the_uninterrupted_adapter(uninterrupted, tmp_path, chain):
    """Resume from the step-``chain[0]`` checkpoint to the end; with two steps, resume again from the resumed
    run's own checkpoint at the second step (a second preemption within the same epoch)."""
    root, _, full = uninterrupted
    ckpt, runs = step_checkpoint(root, chain[0]), []
    for i in range(len(chain)):
        run_root = tmp_path / f"run{i}"
        runs.append((run_root, fit(run_root, ckpt_path=ckpt)[1]))
        if i + 1 < len(chain):
            ckpt = step_checkpoint(run_root, chain[i + 1])
    last_root, batches = runs[-1]
    # the same rows in the same order: no batch trained twice or skipped
    assert batches.seen == full.seen[chain[-1] * ACCUMULATE:]
    expected = load_file(root / "adapter" / "adapter_model.safetensors")
    got = load_file(last_root / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert any(t.abs().sum() > 0 for n, t in expected.items() if "bias" not in n)


@pytest.mark.parametrize("distributed", [True, False])
def test_adapter_only_checkpoints_refuse_the_distributed_checkpoint_format(distributed):
    """torch.distributed.checkpoint loads every key of the model, so a sharded adapter-only checkpoint could never
    be resumed ("Missing key ... embed_tokens.weight", seen with 2 processes); the full format resumes exactly."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed)
    trainer = SimpleNamespace(strategy=strategy, is_global_zero=True, world_size=2)
    callback = RoCoFT(mode="row", rank=2, adapter_only_checkpoint=True)
    if distributed:
        with pytest.raises(ValueError, match="save_distributed_checkpoint to false"):
            callback.setup(trainer, module(), "fit")
    else:
        callback.setup(trainer, module(), "fit")


def test_another_global_batch_cannot_continue_the_epoch_and_says_so():
    dm = datamodule()
    dm.setup("fit")
    with pytest.warns(UserWarning, match="trained with 4 rows per batch.*this run has 2"):
        dm.load_state_dict({"epoch": 0, "batches": 6, "global_batch": 4})
    assert dm._resume_at is None
    dm.load_state_dict({"epoch": 0, "batches": 6, "global_batch": 2})
    assert dm._resume_at == (0, 6) and dm.train_dataloader().sampler.resumed == (0, 6)
    dm.setup("fit")  # a new run forgets the position
    assert dm._resume_at is None


@pytest.mark.parametrize("replicas", [1, 2])
def test_sampler_resumes_after_the_trained_global_batches(replicas):
    lengths = [(7 * i) % 23 + 1 for i in range(21)]

    def order(epoch, resume=None):
        samplers = [LengthGroupedSampler(lengths, 2, mega_batch_factor=2, seed=3, num_replicas=replicas, rank=r)
                    for r in range(replicas)]
        for s in samplers:
            s.set_epoch(epoch)
            if resume is not None:
                s.resume_at(*resume)
            s.set_epoch(epoch)  # Lightning sets the epoch again at the epoch's start
        return [list(s) for s in samplers], len(samplers[0])

    whole, length = order(1)
    tail, resumed_length = order(1, resume=(1, 3))
    assert resumed_length == length  # Lightning counts the trained batches itself
    assert tail == [rows[3 * 2:] for rows in whole]  # 3 global batches = 3 batches of 2 rows on every rank
    assert order(2, resume=(1, 3))[0] == order(2)[0]  # the next epoch is whole
    batches_per_epoch = -(-length // 2)
    assert order(2, resume=(1, batches_per_epoch))[0] == order(2)[0]  # a finished epoch resumes at the next one


@pytest.mark.parametrize("name", ["commonsense", "math", "smollm2_synthetic"])
def test_llm_configs_checkpoint_adapters_during_training(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    trainer = config["trainer"]
    assert trainer.get("enable_checkpointing", True) is True
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in trainer["callbacks"]}
    assert callbacks["rocoft_pl.RoCoFT"]["adapter_only_checkpoint"] is True
    kwargs = callbacks["lightning.pytorch.callbacks.ModelCheckpoint"]
    assert kwargs["dirpath"] == f"runs/reasoning/{name}/checkpoints"
    assert kwargs["every_n_train_steps"] >= 1 and kwargs["save_last"] is True
    assert 1 <= kwargs["save_top_k"] <= 3  # the latest few, not one file per N steps
    ModelCheckpoint(**kwargs)  # a valid combination (save_top_k > 1 needs a monitor: the step)


# -- FSDP2: ModelParallelStrategy as configs/fsdp use it, 2 gloo processes on CPU ----------------------------------
def fit_sharded(out: Path, name: str, ckpt_path=None) -> None:
    """The model built on the meta device, RoCoFT applied, blocks sharded, then rank 0 loads the base weights and
    broadcasts; adapter-only checkpoints in the full format (rank 0 writes one file). 15 rows, 2 per rank: 3
    global batches (2 optimizer steps) per epoch, so step 3 is mid-epoch in the second epoch."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    m = CausalLMModule(str(out / "base"), learning_rate=2e-2, warmup_steps=1, scheduler="cosine", adam_epsilon=1e-3,
                       max_new_tokens=2, init_on_meta=True, tokenizer=tl.tiny_tokenizer())
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    rocoft = RoCoFT(mode="row", rank=2, selection="random", adapter_only_checkpoint=True,
                    adapter_dir=str(out / name / "adapter"))
    checkpoints = ModelCheckpoint(dirpath=out / name / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4,
                         accumulate_grad_batches=ACCUMULATE, callbacks=[rocoft, checkpoints], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=out / name)
    trainer.fit(m, datamodule=datamodule(), ckpt_path=ckpt_path)


def test_fsdp2_resume_reproduces_the_uninterrupted_adapter(tmp_path):
    tl.tiny_llama().save_pretrained(tmp_path / "base")
    tl.tiny_tokenizer().save_pretrained(tmp_path / "base")
    dist_launch.run_script(Path(__file__), tmp_path, timeout=300)
    path = step_checkpoint(tmp_path / "full", 3)
    state = torch.load(path, weights_only=True)["state_dict"]  # one file, plain tensors (gathered on rank 0)
    assert state and all(k.endswith((".delta", ".indices")) for k in state)
    expected = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


if __name__ == "__main__":  # the 2-process part of the test above (Lightning relaunches this file for rank 1)
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    fit_sharded(out, "full")
    fit_sharded(out, "resumed", ckpt_path=step_checkpoint(out / "full", 3))
