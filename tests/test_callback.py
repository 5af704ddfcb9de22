"""The RoCoFT Lightning callback in one process: fit, resume, idempotence, lazy backbones, checkpoints."""

import logging
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyClassifier, tiny_bert, tiny_loader

from rocoft_pl import RoCoFT, load_adapter, rocoft_layers


Classifier = TinyClassifier
loader = tiny_loader


class LazyClassifier(Classifier):
    """Builds its backbone in configure_model, after Callback.setup."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = tiny_bert()


def trainer(tmp_path, callback, **kw):
    kw.setdefault("max_steps", 3)
    return pl.Trainer(
        callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", **kw,
    )


def indices(module):
    return {n: l.indices.tolist() for n, l in rocoft_layers(module).items()}


def deltas(module):
    return {n: l.delta.detach().clone() for n, l in rocoft_layers(module).items()}


def test_fit_trains_only_rocoft_and_head_and_saves_adapter(tmp_path):
    module = Classifier()
    frozen_before = module.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    cb = RoCoFT(rank=2, adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path, cb).fit(module, loader())
    layer = module.model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(layer.base.weight, frozen_before)
    assert layer.delta.abs().sum() > 0
    assert cb.report.rocoft_params == sum(l.num_trainable for l in rocoft_layers(module).values())
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "adapter")
    batch = next(iter(loader()))
    module.eval()
    torch.testing.assert_close(fresh(**batch).logits, module.model(**batch).logits)


@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_fit_in_bf16_mixed_uses_the_fused_nodes_and_keeps_fp32_deltas(tmp_path, mode):
    module = Classifier()
    frozen_before = module.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    nodes = []
    hook = lambda m, args, out: nodes.append(type(out.grad_fn).__name__)  # noqa: E731
    cb = RoCoFT(mode=mode, rank=2)
    t = trainer(tmp_path, cb, precision="bf16-mixed")
    module.on_fit_start = lambda: [l.register_forward_hook(hook) for l in rocoft_layers(module).values()]
    t.fit(module, loader())
    layer = module.model.bert.encoder.layer[0].attention.self.query
    node = {"row": "_RowDelta", "column": "_ColumnDelta", "both": "_RowColumnDelta"}[mode]
    assert nodes and all(n.startswith(node) for n in nodes)
    assert all(d.dtype == torch.float32 and d.abs().sum() > 0 for d in layer.deltas.values())
    assert torch.equal(layer.base.weight, frozen_before)


def test_setup_is_idempotent_across_stages(tmp_path):
    module, cb = Classifier(), RoCoFT(rank=1)
    t = trainer(tmp_path, cb)
    t.fit(module, loader())
    n = len(rocoft_layers(module))
    t.validate(module, loader())
    t.test(module, loader())
    t.predict(module, loader())
    assert len(rocoft_layers(module)) == n == 12
    assert not any(isinstance(l.base, type(l)) for l in rocoft_layers(module).values())


def test_lazy_backbone_in_configure_model(tmp_path):
    module = LazyClassifier()
    cb = RoCoFT(rank=2, mode="column")
    trainer(tmp_path, cb).fit(module, loader())
    assert len(rocoft_layers(module)) == 12
    assert cb.report.rocoft_params > 0


@pytest.mark.parametrize("adapter_only", [False, True])
def test_resume_restores_wanda_indices_and_deltas(tmp_path, adapter_only):
    module = Classifier()
    cb = RoCoFT(rank=2, selection="max", calibration_batches=2, adapter_only_checkpoint=adapter_only)
    t = trainer(tmp_path, cb, max_steps=3)
    t.fit(module, loader())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    assert any(v != [0, 1] for v in indices(module).values())  # Wanda did not pick the first rows

    state = torch.load(ckpt, weights_only=True)["state_dict"]
    if adapter_only:
        assert all(k.endswith((".delta", ".indices")) or k.startswith("model.classifier.") for k in state)
        assert sum(v.numel() for v in state.values()) < 1000
    else:
        assert any(k.endswith("base.weight") for k in state)

    resumed = Classifier()  # same base weights (seeded)
    # max_steps equal to the checkpoint's step: restore only, no further training.
    trainer(tmp_path, RoCoFT(rank=2, selection="max", adapter_only_checkpoint=adapter_only), max_steps=3).fit(
        resumed, loader(), ckpt_path=ckpt
    )
    assert indices(resumed) == indices(module)
    for name, d in deltas(module).items():
        torch.testing.assert_close(deltas(resumed)[name], d)


def test_resume_with_a_different_config_is_refused(tmp_path):
    module = Classifier()
    t = trainer(tmp_path, RoCoFT(rank=2), max_steps=1)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="another RoCoFT config.*mode"):
        trainer(tmp_path, RoCoFT(rank=2, mode="column"), max_steps=2).fit(Classifier(), loader(), ckpt_path=tmp_path / "c.ckpt")


def test_load_adapter_from_for_evaluation(tmp_path):
    module = Classifier()
    trainer(tmp_path, RoCoFT(rank=2, adapter_dir=str(tmp_path / "a"))).fit(module, loader())
    evaluated = Classifier()
    t = trainer(tmp_path, RoCoFT(load_adapter_from=str(tmp_path / "a")))
    t.validate(evaluated, loader())
    assert indices(evaluated) == indices(module)
    for name, d in deltas(module).items():
        torch.testing.assert_close(deltas(evaluated)[name], d)


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match="rank"):
        RoCoFT(rank=0)
    with pytest.raises(ValueError, match="calibration_batches"):
        RoCoFT(calibration_batches=0)
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        RoCoFT(load_adapter_from="/nonexistent/adapter")


def test_targets_matching_nothing_fail_at_setup(tmp_path):
    with pytest.raises(ValueError, match="match nothing"):
        trainer(tmp_path, RoCoFT(targets=["nope"])).fit(Classifier(), loader())


# -- paths are checked in setup, before any training step ------------------------------------------------------
class CountingClassifier(Classifier):
    def __init__(self):
        super().__init__()
        self.steps_run = 0

    def training_step(self, batch, i):
        self.steps_run += 1
        return super().training_step(batch, i)


def _unwritable_adapter_dirs(tmp_path):
    """Paths no adapter can be written to, even as root (tests run as root, where chmod stops nothing)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    cases = {
        "under a file": (blocker / "adapter", "file.txt is not a directory"),
        "is a file": (blocker, "exists and is not a directory"),
    }
    if Path("/proc").is_dir():
        cases["in /proc"] = (Path("/proc/rocoft-test/adapter"), "cannot write in /proc")
    return cases


@pytest.mark.parametrize("case", ["under a file", "is a file", "in /proc"])
def test_unwritable_adapter_dir_fails_in_setup_before_training(tmp_path, case):
    cases = _unwritable_adapter_dirs(tmp_path)
    if case not in cases:
        pytest.skip("no /proc here")
    path, words = cases[case]
    before = sorted(tmp_path.rglob("*"))
    module = CountingClassifier()
    t = trainer(tmp_path, RoCoFT(rank=2, adapter_dir=str(path)))
    with pytest.raises(OSError, match=f"adapter_dir {re.escape(str(path))}.*{re.escape(words)}"):
        t.fit(module, loader())
    assert module.steps_run == 0 and t.global_step == 0
    assert not rocoft_layers(module)  # failed before RoCoFT touched the model
    assert sorted(tmp_path.rglob("*")) == before  # no probe left behind


def test_adapter_dir_holding_other_files_fails_in_setup_before_training(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("the user's own file, which replacing the directory would drop")
    module = CountingClassifier()
    t = trainer(tmp_path, RoCoFT(rank=2, adapter_dir=str(tmp_path / "adapter")))
    with pytest.raises(ValueError, match="notes.txt"):
        t.fit(module, loader())
    assert module.steps_run == 0 and not rocoft_layers(module)


def test_a_diverged_run_is_not_saved_and_says_why(tmp_path):
    class Diverging(Classifier):
        def on_train_end(self):
            with torch.no_grad():
                next(iter(rocoft_layers(self).values())).delta.fill_(float("nan"))

    t = trainer(tmp_path, RoCoFT(rank=2, adapter_dir=str(tmp_path / "adapter")))
    with pytest.raises(ValueError, match="NaN / inf.*diverged"):
        t.fit(Diverging(), loader())
    assert not (tmp_path / "adapter").exists()


def test_adapter_dir_check_creates_and_leaves_nothing(tmp_path):
    from rocoft_pl.callback import check_writable_dir

    check_writable_dir(tmp_path / "not" / "yet" / "there")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "existing").mkdir()
    check_writable_dir(tmp_path / "existing")
    assert [p.name for p in tmp_path.rglob("*")] == ["existing"]


def test_load_adapter_from_needs_both_adapter_files(tmp_path):
    module = Classifier()
    trainer(tmp_path, RoCoFT(rank=2, adapter_dir=str(tmp_path / "a"))).fit(module, loader())
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        RoCoFT(load_adapter_from=str(tmp_path / "a"))


def test_load_adapter_from_is_checked_again_in_setup(tmp_path):
    module = Classifier()
    trainer(tmp_path, RoCoFT(rank=2, adapter_dir=str(tmp_path / "a"))).fit(module, loader())
    cb = RoCoFT(load_adapter_from=str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_config.json").unlink()  # gone between construction and use
    evaluated = Classifier()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        trainer(tmp_path, cb).validate(evaluated, loader())
    assert not rocoft_layers(evaluated)


# -- the report: summary lines by default, the per-layer table on request --------------------------------------
@pytest.fixture
def rocoft_log():
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("rocoft_pl")
    level = logger.level
    logger.addHandler(handler)
    yield logger, records
    logger.removeHandler(handler)
    logger.setLevel(level)


TABLE_HEADER = "shape (out x in)"


def _messages(records, level=logging.INFO):
    return "\n".join(r.getMessage() for r in records if r.levelno >= level)


def test_report_logs_the_summary_and_keeps_the_table_for_debug(tmp_path, rocoft_log):
    logger, records = rocoft_log
    logger.setLevel(logging.INFO)
    trainer(tmp_path, RoCoFT(rank=2), max_steps=1).fit(Classifier(), loader())
    shown = _messages(records)
    assert "RoCoFT (row, r=2, selection=first) on 12 layers" in shown
    assert "RoCoFT parameters:" in shown and "head parameters:" in shown and "trainable parameters:" in shown
    assert TABLE_HEADER not in shown and "attention.self.query" not in shown
    assert len(shown.splitlines()) <= 5

    records.clear()
    logger.setLevel(logging.DEBUG)
    trainer(tmp_path, RoCoFT(rank=2), max_steps=1).fit(Classifier(), loader())
    debug = [r for r in records if r.levelno == logging.DEBUG]
    assert len(debug) == 1 and TABLE_HEADER in debug[0].getMessage()
    assert len(debug[0].getMessage().splitlines()) == 13  # header + 12 adapted layers


def test_print_layers_shows_the_table(tmp_path, rocoft_log):
    logger, records = rocoft_log
    logger.setLevel(logging.INFO)
    trainer(tmp_path, RoCoFT(rank=2, print_layers=True), max_steps=1).fit(Classifier(), loader())
    shown = _messages(records)
    assert TABLE_HEADER in shown and "bert.encoder.layer.1.output.dense" in shown
    assert "trainable parameters:" in shown


# -- mode 'both' ------------------------------------------------------------------------------------------
def test_fit_in_mode_both_changes_only_the_selected_rows_and_columns(tmp_path):
    from rocoft_pl import merge_rocoft

    module = Classifier()
    w0 = {n: p.detach().clone() for n, p in module.model.named_parameters() if n.endswith(".weight")}
    cb = RoCoFT(mode="both", rank=2, selection="random", seed=4, adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path, cb).fit(module, loader())
    layers = rocoft_layers(module.model)
    assert cb.report.rocoft_params == sum(2 * (l.in_features + l.out_features) - 4 for l in layers.values())
    chosen = {n: (l.indices.tolist(), l.column_indices.tolist()) for n, l in layers.items()}
    assert all(d.abs().sum() > 0 for l in layers.values() for d in l.deltas.values())
    assert all(torch.equal(l.delta_columns[l.indices], torch.zeros(2, 2)) for l in layers.values())  # inert, untouched

    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "adapter")
    batch = next(iter(loader()))
    module.eval()
    torch.testing.assert_close(fresh(**batch).logits, module.model(**batch).logits)

    merge_rocoft(module.model)
    for name, (rows, cols) in chosen.items():
        merged, before = module.model.get_submodule(name).weight, w0[f"{name}.weight"]
        selected = torch.zeros_like(before, dtype=torch.bool)
        selected[rows] = True
        selected[:, cols] = True
        changed = merged.ne(before)
        assert changed[selected].all(), name
        assert torch.equal(merged[~selected], before[~selected]), name


def test_wanda_in_mode_both_calibrates_and_resumes_from_an_adapter_only_checkpoint(tmp_path):
    module = Classifier()
    cb = RoCoFT(mode="both", rank=2, selection="max", calibration_batches=2, adapter_only_checkpoint=True)
    t = trainer(tmp_path, cb, max_steps=2)
    t.fit(module, loader())
    ckpt = tmp_path / "both.ckpt"
    t.save_checkpoint(ckpt)
    chosen = {n: (l.indices.tolist(), l.column_indices.tolist()) for n, l in rocoft_layers(module).items()}
    assert any(rows != [0, 1] for rows, _ in chosen.values()) and any(cols != [0, 1] for _, cols in chosen.values())
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(k.endswith((".delta", ".delta_columns", ".indices", ".column_indices")) or ".classifier." in k for k in state)
    assert sum(k.endswith(".column_indices") for k in state) == 12

    resumed = Classifier()
    cb2 = RoCoFT(mode="both", rank=2, selection="max", adapter_only_checkpoint=True)
    trainer(tmp_path, cb2, max_steps=2).fit(resumed, loader(), ckpt_path=ckpt)
    assert {n: (l.indices.tolist(), l.column_indices.tolist()) for n, l in rocoft_layers(resumed).items()} == chosen
    for name, layer in rocoft_layers(module).items():
        for key, d in layer.deltas.items():
            torch.testing.assert_close(rocoft_layers(resumed)[name].deltas[key], d)


def test_rank_zero_indices_replace_both_index_sets_on_every_rank():
    """What DDP / FSDP2 runs after Wanda (tests/test_distributed.py runs it for rows): here with a stand-in
    strategy whose broadcast returns rank 0's choice, for the two index sets of mode 'both'."""
    from types import SimpleNamespace

    from rocoft_pl import RoCoFTConfig, apply_rocoft
    from rocoft_pl.callback import _use_rank_zero_indices

    module = Classifier()
    apply_rocoft(module, RoCoFTConfig(mode="both", rank=2))
    rank0 = {n: {"indices": torch.tensor([3, 5]), "column_indices": torch.tensor([1, 7])} for n in rocoft_layers(module)}
    sent = []
    strategy = SimpleNamespace(broadcast=lambda obj, src: sent.append(obj) or rank0)
    _use_rank_zero_indices(SimpleNamespace(world_size=2, strategy=strategy), module)
    assert set(sent[0][next(iter(sent[0]))]) == {"indices", "column_indices"}
    for layer in rocoft_layers(module).values():
        assert layer.indices.tolist() == [3, 5] and layer.column_indices.tolist() == [1, 7]
        assert {k: v.tolist() for k, v in layer.cpu_indices().items()} == {"indices": [3, 5], "column_indices": [1, 7]}


def test_fsdp1_is_refused_before_anything_changes():
    """FSDPStrategy (FSDP1) would write an adapter of flattened deltas: refused in setup, the model untouched."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"FSDPStrategy \(FSDP1\).*ModelParallelStrategy"):
        RoCoFT(rank=1).setup(SimpleNamespace(strategy=FSDPStrategy()), model, "fit")
    assert isinstance(model[0], torch.nn.Linear)
