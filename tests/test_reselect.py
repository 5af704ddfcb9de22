"""Re-selection (rocoft_pl.reselect and the callback's reselect_every): fold, criteria, consolidate, fit."""

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, batch, tiny_bert, tiny_gpt2, tiny_loader
from torch import nn
from transformers.pytorch_utils import Conv1D

from rocoft_pl import RoCoFT, RoCoFTConfig, apply_rocoft, load_adapter, merge_rocoft, rocoft_layers, save_adapter
from rocoft_pl.adapter import config_of, read_adapter
from rocoft_pl.layers import RoCoFTLinear
from rocoft_pl.reselect import (
    attach_probe,
    consolidate,
    fold,
    folded_state,
    is_folded,
    pick,
    reselect_generator,
    row_scores,
    scores_from_stats,
)
from rocoft_pl.selection import select_indices, wanda_scores

IN, OUT = 6, 8


def _layer(kind, mode, indices=(1, 4)):
    base = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    layer = RoCoFTLinear(base, mode, torch.tensor(indices))
    for p in layer.base.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        layer.delta.normal_()
    return layer


def _logical(layer):
    return layer._logical_weight().detach().clone()


# -- fold -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode", ["row", "column"])
def test_fold_keeps_the_function_and_records_exact_originals(kind, mode):
    layer = _layer(kind, mode)
    x = torch.randn(3, 5, IN)
    w0, delta = _logical(layer), layer.delta
    expected = layer(x).detach()
    dim = 0 if mode == "row" else 1

    fold(layer, torch.tensor([1, 4]))  # the same rows: W0 takes the delta, the delta restarts at zero
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    assert layer.delta is delta and torch.equal(layer.delta, torch.zeros_like(delta))
    with torch.no_grad():
        layer.delta.normal_()
    expected = layer(x).detach()
    fold(layer, torch.tensor([5, 1]))  # overlapping new rows, given unsorted
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    assert layer.indices.tolist() == [1, 5] and layer.cpu_indices()["indices"].tolist() == [1, 5]

    state = folded_state(layer)
    assert state.touched.tolist() == [1, 4]  # row 1 was folded twice, its original kept from the first fold
    assert torch.equal(state.originals, w0.index_select(dim, torch.tensor([1, 4])))
    untouched = [i for i in range(w0.shape[dim]) if i not in (1, 4)]
    assert torch.equal(_logical(layer).index_select(dim, torch.tensor(untouched)), w0.index_select(dim, torch.tensor(untouched)))


def test_fold_refuses_what_it_cannot_do():
    layer = _layer("linear", "row")
    with pytest.raises(ValueError, match="2 unique new indices"):
        fold(layer, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="out of range"):
        fold(layer, torch.tensor([1, OUT]))
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        fold(layer, torch.tensor([0, 1]))
    both = RoCoFTLinear(nn.Linear(IN, OUT), "both", torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="modes .*row.*column.*not 'both'"):
        fold(both, torch.tensor([2, 3]))


# -- consolidate ----------------------------------------------------------------------------------------
def _model(model_fn, mode):
    model = model_fn()
    apply_rocoft(model, RoCoFTConfig(mode=mode, rank=2, selection="random", seed=1))
    return model


def _inputs(model_fn):
    b = batch()
    if model_fn is tiny_gpt2:
        b.pop("labels")
    return b


def _train_with_folds(model, model_fn, rounds=3, steps=2):
    """AdamW steps with a fold after every ``steps``: random rows, and one round that keeps a row, so the
    rows trained overlap across rounds."""
    b = _inputs(model_fn)
    deltas = [l.delta for l in rocoft_layers(model).values()]
    opt = torch.optim.AdamW(deltas, lr=1e-2)
    model.train()
    for round_ in range(1, rounds + 1):
        for _ in range(steps):
            out = model(**b)
            loss = out.loss if model_fn is tiny_bert else out.logits.square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for name, layer in rocoft_layers(model).items():
            new = pick(layer, row_scores(layer, None, None, "random", reselect_generator(1, name, round_)))
            if round_ == 2:
                new = torch.tensor(sorted({int(layer.indices[0]), *[int(i) for i in new if i != layer.indices[0]][:1]}))
            fold(layer, new)
        for d in deltas:
            opt.state.pop(d, None)
    for _ in range(steps):  # the current rows train too
        out = model(**b)
        loss = out.loss if model_fn is tiny_bert else out.logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("model_fn", [tiny_bert, tiny_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("mode", ["row", "column"])
def test_consolidate_is_exact_against_the_original_w0(model_fn, mode):
    model = _model(model_fn, mode)
    original = {n: _logical(l) for n, l in rocoft_layers(model).items()}
    _train_with_folds(model, model_fn)
    layers = rocoft_layers(model)
    assert is_folded(model)
    touched = {
        n: torch.unique(torch.cat([folded_state(l).touched, l.indices])).tolist() for n, l in layers.items()
    }
    assert any(len(t) < 8 for t in touched.values())  # rounds overlapped somewhere
    effective = {n: _logical(l) + l.delta_weight().detach() for n, l in layers.items()}
    b = _inputs(model_fn)
    with torch.no_grad():
        before = model(**b).logits

    made = consolidate(model)

    assert not is_folded(model)
    rank = max(len(t) for t in touched.values())
    assert made.rank == rank and config_of(model).rank == rank and made.touched == {n: len(t) for n, t in touched.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, before, atol=1e-6, rtol=0)
    for name, layer in rocoft_layers(model).items():
        assert torch.equal(_logical(layer), original[name])  # every row, touched or not, bit-exact
        assert layer.indices.numel() == rank and set(touched[name]) <= set(layer.indices.tolist())
        assert layer.delta.requires_grad and isinstance(layer.delta, nn.Parameter)
        torch.testing.assert_close(_logical(layer) + layer.delta_weight().detach(), effective[name], atol=1e-6, rtol=0)
        padded = [i for i, j in enumerate(layer.indices.tolist()) if j not in touched[name]]
        dim = 0 if mode == "row" else 1
        assert torch.equal(layer.delta.detach().index_select(dim, torch.tensor(padded, dtype=torch.long)).abs().sum(), torch.tensor(0.0))
    if mode == "column":  # the layout _zero_delta gives column deltas: the transpose of an (R, out) block
        assert all(l.delta.t().is_contiguous() for l in rocoft_layers(model).values())


def test_save_refuses_a_folded_model_and_the_consolidated_adapter_round_trips(tmp_path):
    model = _model(tiny_bert, "row")
    _train_with_folds(model, tiny_bert, rounds=2)
    with pytest.raises(ValueError, match=r"consolidate\(model\) first"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"consolidate\(model\) first"):
        merge_rocoft(model)
    assert not (tmp_path / "a").exists()
    made = consolidate(model)
    save_adapter(model, tmp_path / "a")
    metadata, tensors = read_adapter(tmp_path / "a")
    assert metadata["config"]["rank"] == made.rank > 2
    assert sum(t.numel() for k, t in tensors.items() if k.endswith(".delta")) == made.elements
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "a")
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**b).logits, model(**b).logits, atol=1e-6, rtol=0)


# -- criteria -------------------------------------------------------------------------------------------
def _reference_gradient(layer, x, grad_y):
    """dL/dW of the logical weight by autograd, for L = <y, grad_y>."""
    w = (_logical(layer) + layer.delta_weight().detach()).requires_grad_(True)
    (F.linear(x, w) * grad_y).sum().backward()
    return w.grad


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode", ["row", "column"])
def test_gradient_criterion_is_the_norm_of_the_full_weight_gradient(kind, mode):
    layer = _layer(kind, mode)
    x, grad_y = torch.randn(2, 5, IN), torch.randn(2, 5, OUT)
    g = _reference_gradient(layer, x, grad_y)
    expected = g.norm(dim=1 if mode == "row" else 0)
    torch.testing.assert_close(row_scores(layer, x, grad_y, "gradient"), expected, rtol=1e-5, atol=1e-6)

    # The same from the probe's hooks on a real backward through the layer.
    stats, handles = attach_probe({"l": layer}, "gradient")
    (layer(x) * grad_y).sum().backward()
    for h in handles:
        h.remove()
    torch.testing.assert_close(scores_from_stats(layer, "gradient", stats["l"]), expected, rtol=1e-5, atol=1e-6)


def test_gradient_criterion_picks_the_rows_the_loss_depends_on():
    layer = _layer("conv1d", "row", indices=(0, 1))
    x = torch.randn(4, IN)
    stats, handles = attach_probe({"l": layer}, "gradient")
    y = layer(x)
    (3 * y[:, 6].sum() + 2 * y[:, 2].sum() + y[:, 5].sum()).backward()  # row gradients 3s, 2s, s, 0
    for h in handles:
        h.remove()
    assert pick(layer, scores_from_stats(layer, "gradient", stats["l"])).tolist() == [2, 6]


@pytest.mark.parametrize("mode", ["row", "column"])
def test_wanda_criterion_reproduces_the_selection_scores(mode):
    layer = _layer("conv1d", mode)
    x = torch.randn(3, 7, IN)
    norms = x.reshape(-1, IN).norm(dim=0)
    expected = wanda_scores(_logical(layer) + layer.delta_weight().detach(), norms, mode)  # the weight now: W0 + R
    torch.testing.assert_close(row_scores(layer, x, None, "wanda"), expected, rtol=1e-6, atol=0)  # norms: float64 sums there
    with torch.no_grad():
        layer.delta.zero_()
    chosen = select_indices(layer.base, "l", mode, 2, 0.1, "max", 0, norms)
    assert pick(layer, row_scores(layer, x, None, "wanda")).tolist() == chosen.tolist()


def test_random_criterion_is_deterministic_per_seed_module_and_round():
    layer = RoCoFTLinear(nn.Linear(4, 64), "row", torch.tensor([0, 1, 2]))

    def draw(seed, name, round_):
        return pick(layer, row_scores(layer, None, None, "random", reselect_generator(seed, name, round_))).tolist()

    assert draw(0, "a", 1) == draw(0, "a", 1)
    assert len({tuple(draw(0, "a", r)) for r in (1, 2, 3)}) == 3
    assert draw(0, "a", 1) != draw(0, "b", 1) and draw(0, "a", 1) != draw(5, "a", 1)


# -- the callback ---------------------------------------------------------------------------------------
def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 6)
    return pl.Trainer(
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu", **kw,
    )


class Spy(pl.Callback):
    """After each RoCoFT round (it runs after RoCoFT's hook): the step, the batches seen, the deltas'
    optimizer state and whether they are zero."""

    def __init__(self, rocoft):
        self.rocoft, self.batches, self.rounds = rocoft, 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if self.rocoft.reselect_rounds > len(self.rounds):
            deltas = [l.delta for l in rocoft_layers(pl_module).values()]
            state = [trainer.optimizers[0].state.get(d) for d in deltas]
            zero = all(torch.equal(d, torch.zeros_like(d)) for d in deltas)
            self.rounds.append((trainer.global_step, self.batches, all(s is None for s in state), zero, is_folded(pl_module)))


@pytest.mark.parametrize("criterion", ["gradient", "wanda", "random"])
def test_fit_reselects_every_k_steps_and_saves_an_exact_adapter(tmp_path, criterion):
    module = TinyClassifier()
    w0 = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb = RoCoFT(rank=2, reselect_every=2, reselect_by=criterion, adapter_dir=str(tmp_path / "adapter"))
    spy = Spy(cb)
    _trainer(tmp_path, [cb, spy]).fit(module, tiny_loader())
    # Rounds after steps 2 and 4, none after the last step (6); each right after an optimizer step.
    assert cb.reselect_rounds == 2
    assert spy.rounds == [(2, 2, True, True, True), (4, 4, True, True, True)]
    assert not is_folded(module)
    rank = config_of(module).rank
    assert 2 < rank <= 6 and cb.config.rank == 2
    for name, p in module.model.named_parameters():
        if name.endswith("base.weight"):
            assert torch.equal(p, w0[name.replace(".base.", ".")])  # W0 is the original again
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "adapter")
    b = next(iter(tiny_loader()))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**b).logits, module.model(**b).logits, atol=1e-6, rtol=0)


def test_no_round_after_the_last_step_of_an_epoch_budget(tmp_path):
    cb = RoCoFT(rank=2, reselect_every=2, reselect_by="random")
    spy = Spy(cb)
    _trainer(tmp_path, [cb, spy], max_steps=-1, max_epochs=1, limit_train_batches=4).fit(TinyClassifier(), tiny_loader())
    assert [r[0] for r in spy.rounds] == [2]  # not after step 4, the last: its rows would never train
    assert cb.reselect_rounds == 1


def test_rounds_follow_optimizer_steps_under_gradient_accumulation(tmp_path):
    cb = RoCoFT(rank=2, reselect_every=2, reselect_by="gradient")
    spy = Spy(cb)
    _trainer(tmp_path, [cb, spy], max_steps=5, accumulate_grad_batches=2).fit(TinyClassifier(), tiny_loader())
    assert [(step, seen) for step, seen, *_ in spy.rounds] == [(2, 4), (4, 8)]
    assert all(fresh for _, _, fresh, *_ in spy.rounds)


def test_a_checkpoint_written_after_a_round_is_refused(tmp_path):
    module = TinyClassifier()
    t = _trainer(tmp_path, [RoCoFT(rank=2, reselect_every=1, reselect_by="random")], max_steps=2)
    t.fit(module, tiny_loader())
    t.save_checkpoint(tmp_path / "r.ckpt")
    again = _trainer(tmp_path, [RoCoFT(rank=2, reselect_every=1, reselect_by="random")], max_steps=3)
    with pytest.raises(ValueError, match="after 1 RoCoFT re-selection rounds"):
        again.fit(TinyClassifier(), tiny_loader(), ckpt_path=tmp_path / "r.ckpt")


def test_ranks_take_rank_zeros_choice():
    """What DDP runs after a round, with a stand-in strategy whose broadcast returns rank 0's indices."""
    module = TinyClassifier()
    apply_rocoft(module, RoCoFTConfig(rank=2))
    rank0 = {n: {"indices": torch.tensor([3, 5])} for n in rocoft_layers(module)}
    strategy = SimpleNamespace(broadcast=lambda obj, src: rank0)
    trainer = SimpleNamespace(world_size=2, strategy=strategy, optimizers=[], is_global_zero=True)
    cb = RoCoFT(rank=2, reselect_every=1, reselect_by="random")
    cb._reselect(trainer, module, 1)
    for layer in rocoft_layers(module).values():
        assert layer.indices.tolist() == [3, 5] and folded_state(layer).touched.tolist() == [0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reselect_every": 0}, "reselect_every must be None"),
        ({"reselect_every": 2.5}, "reselect_every must be None"),
        ({"reselect_every": 2, "reselect_by": "loss"}, "reselect_by must be one of"),
        ({"reselect_every": 2, "mode": "both"}, "not mode 'both'"),
        ({"reselect_every": 2, "mode": "entries", "selection": "random"}, "not mode 'entries'"),
    ],
)
def test_bad_reselect_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoCoFT(**kwargs)


def test_sharded_strategies_are_refused():
    from rocoft_pl.callback import _refuse_sharded_strategy

    class FSDPStrategy:
        pass

    with pytest.raises(ValueError, match="not supported under FSDPStrategy"):
        _refuse_sharded_strategy(SimpleNamespace(strategy=FSDPStrategy()))
    _refuse_sharded_strategy(SimpleNamespace(strategy=SimpleNamespace()))  # single device / DDP: fine


def test_reselection_is_off_by_default(tmp_path):
    module = TinyClassifier()
    cb = RoCoFT(rank=2)
    _trainer(tmp_path, [cb], max_steps=2).fit(module, tiny_loader())
    assert cb.reselect_every is None and cb.reselect_rounds == 0 and config_of(module).rank == 2
    assert not is_folded(module)
    assert copy.deepcopy(cb.state_dict()) == {"config": cb.config.to_dict(), "reselect_rounds": 0}
