"""learning_rate: auto (rocoft_pl.recipe): the rule, its resolution from the model, and its errors."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader
from conftest import tiny_bert, tiny_loader

from rocoft_pl import RoCoFT, RoCoFTConfig, apply_rocoft
from rocoft_pl.recipe import auto_learning_rate, resolve_learning_rate


def test_rule_falls_as_one_over_sqrt_rank():
    assert auto_learning_rate("row", 1) == pytest.approx(2e-2)
    assert auto_learning_rate("column", 4) == pytest.approx(1e-2)
    assert auto_learning_rate("row", 16) == pytest.approx(5e-3)
    for mode in ("both", "entries"):
        with pytest.raises(ValueError, match="give a number"):
            auto_learning_rate(mode, 3)


def test_rule_falls_as_one_over_sqrt_steps_beyond_the_reference_budget():
    assert auto_learning_rate("row", 16, steps=80) == pytest.approx(5e-3)
    assert auto_learning_rate("row", 16, steps=20) == pytest.approx(5e-3)  # short runs: the reference rate
    assert auto_learning_rate("row", 16, steps=320) == pytest.approx(2.5e-3)
    assert auto_learning_rate("column", 3, steps=8000) == pytest.approx(2e-2 / math.sqrt(3) / 10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        auto_learning_rate("row", 3, steps=0)


def test_resolved_from_the_models_layers():
    model = tiny_bert()
    with pytest.raises(ValueError, match="no RoCoFT layers"):
        resolve_learning_rate(model, "auto")
    assert resolve_learning_rate(model, 3e-4) == 3e-4
    with pytest.raises(ValueError, match="a number or 'auto'"):
        resolve_learning_rate(model, "fast")
    apply_rocoft(model, RoCoFTConfig(mode="column", rank=3))
    assert resolve_learning_rate(model, "auto") == pytest.approx(2e-2 / math.sqrt(3))
    assert resolve_learning_rate(model, "auto", steps=320) == pytest.approx(1e-2 / math.sqrt(3))


class StopAfterFirstStep(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


@pytest.mark.parametrize("max_steps, expected", [(1, 1e-2), (320, 5e-3)])  # 2e-2 / sqrt(4) * sqrt(80 / max(T, 80))
def test_a_fit_with_learning_rate_auto_uses_the_rule(tmp_path, max_steps, expected):
    from rocoft_pl.modules.classification import SequenceClassificationModule

    tiny = str(Path(__file__).parent / "fixtures" / "text_classification" / "tiny_bert")
    module = SequenceClassificationModule(tiny, learning_rate="auto", warmup_steps=0, scheduler="constant")
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[RoCoFT(rank=4), StopAfterFirstStep()])
    batches = [{k: (v % 40 if k == "input_ids" else v) for k, v in b.items()} for b in tiny_loader()]  # vocab 40
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 1
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lrs == [pytest.approx(expected)] * len(lrs)  # deltas and head alike
