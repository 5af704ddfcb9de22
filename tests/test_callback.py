"""The RoCoFT Lightning callback in one process: fit, resume, idempotence, lazy backbones, checkpoints."""

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


@pytest.mark.parametrize("mode", ["row", "column"])
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
    assert nodes and all(n.startswith("_RowDelta" if mode == "row" else "_ColumnDelta") for n in nodes)
    assert layer.delta.dtype == torch.float32 and layer.delta.abs().sum() > 0
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
