"""Adapters that must not load (or save) quietly: merged models, partial matches, the meta device, damaged or
non-finite contents, and a writer killed at any step."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_bert, tiny_bert_config, trained
from safetensors.torch import load_file, save_file

from rocoft_pl import RoCoFTConfig, apply_rocoft, load_adapter, merge_rocoft, rocoft_layers, save_adapter, unmerge_rocoft
from rocoft_pl import adapter as adapter_module
from rocoft_pl.adapter import adapter_metadata, adapter_state_dict, config_of, write_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SCRIPTS = Path(__file__).parent / "scripts"


def logits(model):
    return model(**{k: v for k, v in batch().items() if k != "labels"}).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = snapshot(model)
    assert types == before[1]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)


def resave(path, tensors=None, **edit):
    """Rewrite the weights (and their checksum) and edit config fields: a consistent adapter with wrong contents."""
    if tensors is not None:
        save_file(tensors, path / WEIGHTS)
    meta = json.loads((path / CONFIG).read_text())
    meta["weights_sha256"] = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    meta["config"].update(edit)
    (path / CONFIG).write_text(json.dumps(meta))


# -- merged models ---------------------------------------------------------------------------------------


def test_load_onto_a_merged_model_is_refused_and_unmerge_still_restores_w0(tmp_path):
    save_adapter(trained(), tmp_path)
    model = tiny_bert()
    w0 = {n: p.clone() for n, p in model.named_parameters()}
    apply_rocoft(model, RoCoFTConfig(rank=2, selection="random", seed=3))
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            layer.delta.normal_(std=0.1)
    merge_rocoft(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged RoCoFT deltas.*unmerge_rocoft\(model\) first, or load onto a fresh base"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)
    unmerge_rocoft(model)
    plain = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not n.endswith(".delta")}
    assert all(torch.equal(plain[n], w) for n, w in w0.items())


# -- partial matches ---------------------------------------------------------------------------------------


def test_adapter_of_a_2_layer_model_refuses_a_3_layer_model_unless_partial_is_asked_for(tmp_path):
    source = trained()
    save_adapter(source, tmp_path)
    deeper = tiny_bert(num_hidden_layers=3)
    before = snapshot(deeper)
    with pytest.raises(ValueError, match=r"6 would stay unadapted.*num_hidden_layers 2 there, 3 here.*allow_partial=True"):
        load_adapter(deeper, tmp_path)
    assert_unchanged(deeper, before)

    report = load_adapter(deeper, tmp_path, allow_partial=True)
    assert len(rocoft_layers(deeper)) == 12 and report.skipped_targets == []
    assert len(report.unadapted_targets) == 6 and all(".layer.2." in n for n in report.unadapted_targets)
    assert "6 targets the adapter's config selects here have no adapter values" in str(report)
    for name, layer in rocoft_layers(source).items():
        assert torch.equal(rocoft_layers(deeper)[name].delta, layer.delta)


def test_adapter_of_a_3_layer_model_onto_a_2_layer_model(tmp_path):
    save_adapter(trained(lambda: tiny_bert(num_hidden_layers=3)), tmp_path)
    with pytest.raises(ValueError, match=r"do not exist.*allow_partial=True"):
        load_adapter(tiny_bert(), tmp_path)
    shallower = tiny_bert()
    report = load_adapter(shallower, tmp_path, allow_partial=True)
    assert len(rocoft_layers(shallower)) == 12 and len(report.skipped_targets) == 6
    assert "skipped 6 adapter targets" in str(report)


def test_same_targets_on_another_base_structure_are_refused_by_the_fingerprint(tmp_path):
    save_adapter(trained(), tmp_path)
    other = tiny_bert(vocab_size=80)  # every target identical, the embeddings not
    with pytest.raises(ValueError, match=r"base model differs.*vocab_size 64 there, 80 here"):
        load_adapter(other, tmp_path)
    assert not rocoft_layers(other)
    load_adapter(other, tmp_path, allow_partial=True)
    assert len(rocoft_layers(other)) == 12


def test_regex_targets_written_for_a_lightning_module_load_onto_the_bare_model(tmp_path):
    """The stored regex matched names inside the LightningModule ('model.bert...'): checking which targets
    it selects must not refuse the very model it was trained on."""
    import lightning.pytorch as pl

    class Wrapper(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert()

    wrapper = Wrapper()
    apply_rocoft(wrapper, RoCoFTConfig(rank=1, targets=r"model\.bert\.encoder\.layer\.0\..*"))
    save_adapter(wrapper, tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["config_prefix"] == "model."
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert len(rocoft_layers(fresh)) == 6
    load_adapter(Wrapper(), tmp_path)
    save_adapter(fresh, tmp_path / "again")  # the loaded adapter keeps the names its regex saw
    assert json.loads((tmp_path / "again" / CONFIG).read_text())["config_prefix"] == "model."
    load_adapter(tiny_bert(), tmp_path / "again")


def test_format_1_adapters_still_load_with_the_checks_they_allow(tmp_path):
    model = trained()
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG).read_text())
    for key in ("weights_sha256", "config_prefix"):
        meta.pop(key)
    meta["base_model"].pop("fingerprint")
    meta["format_version"] = 1
    (tmp_path / CONFIG).write_text(json.dumps(meta))
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="6 would stay unadapted"):
        load_adapter(tiny_bert(num_hidden_layers=3), tmp_path)


# -- the meta device -----------------------------------------------------------------------------------


def bert_on_meta(**overrides):
    from accelerate import init_empty_weights
    from transformers import BertForSequenceClassification

    with init_empty_weights(include_buffers=False):
        return BertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def materialise(model, base_state):
    """What materialising code does (causal_lm.materialize_and_load): to_empty, the base weights, then
    reset_parameters() of the RoCoFT layers."""
    buffers = {n: b.clone() for n, b in model.named_buffers() if not b.is_meta}  # non-persistent ones too
    model.to_empty(device="cpu")
    for n, b in buffers.items():
        model.get_buffer(n).copy_(b)
    wrapped = {f"{n}.{p}": f"{n}.base.{p}" for n in rocoft_layers(model) for p in ("weight", "bias")}
    model.load_state_dict({wrapped.get(k, k): v for k, v in base_state.items()}, strict=False)
    for layer in rocoft_layers(model).values():
        layer.reset_parameters()
    return model


@pytest.mark.parametrize("mode", ["row", "both"])
def test_load_onto_the_meta_device_keeps_the_deltas_through_materialisation(tmp_path, mode):
    model = trained(modules_to_save=[], train_bias=False, mode=mode)  # only deltas: see the next test for heads
    save_adapter(model, tmp_path)
    meta = bert_on_meta()
    report = load_adapter(meta, tmp_path)
    assert report.rocoft_params == sum(l.num_trainable for l in rocoft_layers(model).values())
    materialise(meta, tiny_bert().state_dict())
    for name, layer in rocoft_layers(model).items():
        loaded = rocoft_layers(meta)[name]
        assert all(torch.equal(loaded.deltas[k], d) for k, d in layer.deltas.items()), name
        assert all(torch.equal(loaded.index_sets[k], i) for k, i in layer.index_sets.items()), name
    torch.testing.assert_close(logits(meta), logits(model), rtol=0, atol=0)


def test_heads_and_biases_onto_the_meta_device_are_refused(tmp_path):
    save_adapter(trained(), tmp_path)  # a trained classifier head and biases
    meta = bert_on_meta()
    types = [type(m) for m in meta.modules()]
    with pytest.raises(ValueError, match=r"meta device.*Load the adapter after materialising"):
        load_adapter(meta, tmp_path)
    assert [type(m) for m in meta.modules()] == types


@pytest.mark.parametrize("mode", ["row", "both"])
def test_init_on_meta_path_of_the_causal_lm_module_loads_the_adapter(tmp_path, mode):
    """CausalLMModule(init_on_meta=True): the callback's load_adapter_from runs on the meta-built model, then
    materialize_and_load fills in the base weights; the adapter's deltas must survive it."""
    sys.path.insert(0, str(SCRIPTS))
    import tiny_causal_lm as tl
    from transformers import AutoModelForCausalLM

    from rocoft_pl.modules.causal_lm import CausalLMModule, materialize_and_load

    tl.tiny_llama().save_pretrained(tmp_path / "base")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    apply_rocoft(eager, RoCoFTConfig(mode=mode, rank=2, selection="random", seed=1))
    with torch.no_grad():
        for layer in rocoft_layers(eager).values():
            for delta in layer.deltas.values():
                delta.normal_(std=0.5)
    save_adapter(eager, tmp_path / "adapter")

    module = CausalLMModule(str(tmp_path / "base"), init_on_meta=True)
    module.model = module._build_empty()
    load_adapter(module, tmp_path / "adapter")
    materialize_and_load(module.model, str(tmp_path / "base"), None, torch.device("cpu"))
    ids = torch.tensor([[5, 9, 23, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(ids).logits, eager(ids).logits)


def test_meta_load_into_fsdp2_shards_and_save_from_them(tmp_path):
    """The same with FSDP2 (DTensor deltas), world size 1, in a subprocess (it initialises a process group);
    and an adapter saved from the shards loads onto the plain model."""
    code = textwrap.dedent(
        f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(SCRIPTS)!r})
        import tiny_causal_lm as tl
        from torch.distributed.device_mesh import init_device_mesh
        from transformers import AutoModelForCausalLM
        from rocoft_pl import RoCoFTConfig, apply_rocoft, load_adapter, rocoft_layers, save_adapter
        from rocoft_pl.modules.causal_lm import CausalLMModule, materialize_and_load, shard_model

        dist.init_process_group("gloo", rank=0, world_size=1)
        out = sys.argv[1]
        tl.tiny_llama().save_pretrained(out + "/base")
        eager = AutoModelForCausalLM.from_pretrained(out + "/base").eval()
        apply_rocoft(eager, RoCoFTConfig(rank=2, selection="random", seed=1))
        with torch.no_grad():
            for layer in rocoft_layers(eager).values():
                layer.delta.normal_(std=0.5)
        save_adapter(eager, out + "/adapter")
        module = CausalLMModule(out + "/base", init_on_meta=True)
        module.model = module._build_empty()
        load_adapter(module, out + "/adapter")
        shard_model(module.model, init_device_mesh("cpu", (1,)), None, True)
        materialize_and_load(module.model, out + "/base", None, torch.device("cpu"))
        layer = next(iter(rocoft_layers(module.model).values()))
        assert hasattr(layer.delta, "full_tensor"), type(layer.delta)
        ids = torch.tensor([[5, 9, 23, 42, 7]])
        with torch.no_grad():
            torch.testing.assert_close(module.model.eval()(ids).logits, eager(ids).logits)
        # saved from the shards, it loads strictly onto the plain model: same fingerprint and targets
        save_adapter(module, out + "/from_shards")
        plain = AutoModelForCausalLM.from_pretrained(out + "/base").eval()
        load_adapter(plain, out + "/from_shards")
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, eager(ids).logits)
        dist.destroy_process_group()
        print("OK")
        """
    )
    sys.path.insert(0, str(SCRIPTS))
    import dist_launch

    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=dist_launch.clean_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_save_from_the_meta_device_says_to_materialise(tmp_path):
    meta = bert_on_meta()
    apply_rocoft(meta, RoCoFTConfig(rank=1))
    with pytest.raises(ValueError, match=r"meta device.*not materialised.*to_empty"):
        save_adapter(meta, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# -- integrity -------------------------------------------------------------------------------------------


def tensor_bytes(path, key):
    """(start, end) byte offsets of one tensor's data in a safetensors file."""
    raw = (path / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def flip_a_delta_byte(path):
    start, _ = tensor_bytes(path, "bert.encoder.layer.0.attention.self.query.delta")
    raw = bytearray((path / WEIGHTS).read_bytes())
    raw[start] ^= 0x01  # the lowest mantissa bit of the first value: still a plausible float
    (path / WEIGHTS).write_bytes(bytes(raw))


def edit_rank(path):
    meta = json.loads((path / CONFIG).read_text())
    meta["config"]["rank"] = 3
    (path / CONFIG).write_text(json.dumps(meta))


def edit_mode(path):
    meta = json.loads((path / CONFIG).read_text())
    meta["config"]["mode"] = "column"
    (path / CONFIG).write_text(json.dumps(meta))


def with_indices(value):
    def damage(path):
        t = load_file(path / WEIGHTS)
        t["bert.encoder.layer.0.attention.self.query.indices"] = value
        resave(path, t)

    return damage


def with_nonfinite_delta(value):
    def damage(path):
        t = load_file(path / WEIGHTS)
        t["bert.encoder.layer.1.output.dense.delta"][0, 0] = value
        resave(path, t)

    return damage


@pytest.mark.parametrize(
    "damage,match",
    [
        (flip_a_delta_byte, "corrupt or was changed after saving"),
        (edit_rank, r"2 row indices, but the stored config says rank 3"),
        (edit_mode, r"delta shape \(2, 16\).*does not fit column mode"),
        (with_indices(torch.tensor([1.0, 4.0])), "must be a 1-D int64 tensor, got torch.float32"),
        (with_indices(torch.tensor([1, 16])), r"outside \[0, 16\)"),
        (with_indices(torch.tensor([-1, 3])), r"outside \[0, 16\)"),
        (with_indices(torch.tensor([4, 4])), "not unique"),
        (with_nonfinite_delta(float("nan")), r"NaN / inf values.*allow_nonfinite=True"),
        (with_nonfinite_delta(float("inf")), r"NaN / inf values.*allow_nonfinite=True"),
    ],
)
def test_damaged_contents_are_refused_before_any_change(tmp_path, damage, match):
    save_adapter(trained(), tmp_path)
    damage(tmp_path)
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)


# A 'both' adapter; intermediate.dense is 24 x 16, so row (< 24) and column (< 16) ranges differ.
DENSE = "bert.encoder.layer.0.intermediate.dense"


def both_with(key, value):
    def damage(path):
        t = load_file(path / WEIGHTS)
        t[f"{DENSE}.{key}"] = value(t[f"{DENSE}.{key}"]) if callable(value) else value
        resave(path, t)

    return damage


def one_column(path):
    t = load_file(path / WEIGHTS)
    t[f"{DENSE}.column_indices"] = t[f"{DENSE}.column_indices"][:1].clone()
    t[f"{DENSE}.delta_columns"] = t[f"{DENSE}.delta_columns"][:, :1].clone()
    resave(path, t)


def drop_delta_columns(path):
    t = load_file(path / WEIGHTS)
    t.pop(f"{DENSE}.delta_columns")
    resave(path, t)


def flip_a_delta_columns_byte(path):
    start, _ = tensor_bytes(path, f"{DENSE}.delta_columns")
    raw = bytearray((path / WEIGHTS).read_bytes())
    raw[start] ^= 0x01
    (path / WEIGHTS).write_bytes(bytes(raw))


def nan_in(d):
    d = d.clone()
    d[0, 0] = float("nan")
    return d


@pytest.mark.parametrize(
    "damage,match",
    [
        (flip_a_delta_columns_byte, "corrupt or was changed after saving"),
        (both_with("column_indices", torch.tensor([1.0, 4.0])), "column_indices must be a 1-D int64 tensor, got torch.float32"),
        (both_with("column_indices", torch.tensor([1, 16])), r"column indices empty or outside \[0, 16\) for a 24x16"),
        (both_with("column_indices", torch.tensor([-1, 3])), r"column indices empty or outside \[0, 16\)"),
        (both_with("column_indices", torch.tensor([4, 4])), "column indices are not unique"),
        (both_with("indices", torch.tensor([1, 24])), r"row indices empty or outside \[0, 24\)"),
        (one_column, "1 column indices, but the stored config says rank 2"),
        (both_with("delta_columns", torch.zeros(16, 2)), r"delta_columns shape \(16, 2\).*does not fit both mode.*expected floating point \(24, 2\)"),
        (both_with("delta_columns", nan_in), r"NaN / inf values.*delta_columns"),
        (drop_delta_columns, "missing keys"),
        (lambda path: resave(path, mode="row"), "unexpected keys"),
    ],
)
def test_damaged_both_adapters_are_refused_before_any_change(tmp_path, damage, match):
    save_adapter(trained(mode="both"), tmp_path)
    damage(tmp_path)
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_index_count_must_equal_the_rank(tmp_path):
    save_adapter(trained(), tmp_path)
    t = load_file(tmp_path / WEIGHTS)
    for key in [k for k in t if k.endswith(".indices")]:
        t[key] = t[key][:1].clone()
        t[key.replace(".indices", ".delta")] = t[key.replace(".indices", ".delta")][:1].clone()
    resave(tmp_path, t)
    with pytest.raises(ValueError, match="1 row indices, but the stored config says rank 2"):
        load_adapter(tiny_bert(), tmp_path)


def test_nonfinite_deltas_are_refused_on_save_unless_allowed_and_load_for_inspection(tmp_path):
    model = trained()
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save.*NaN / inf.*layer\.1\.output\.dense\.delta.*allow_nonfinite=True"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    save_adapter(model, tmp_path / "a", allow_nonfinite=True)
    with pytest.raises(ValueError, match="NaN / inf"):
        load_adapter(tiny_bert(), tmp_path / "a")
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "a", allow_nonfinite=True)
    assert torch.isnan(fresh.bert.encoder.layer[1].output.dense.delta[0, 0])


# -- writing the directory -------------------------------------------------------------------------------


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_files_and_directory_get_ordinary_modes(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    for name in (CONFIG, WEIGHTS):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o666 & ~umask()
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~umask()


def test_a_directory_holding_other_files_is_not_replaced(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not an adapter's: \['notes.txt'\].*another directory"):
        save_adapter(trained(), tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_saving_again_replaces_the_adapter_and_keeps_a_symlink(tmp_path):
    first, second = trained(), trained(rank=1, seed=5)
    save_adapter(first, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save_adapter(second, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert json.loads((tmp_path / "real" / CONFIG).read_text())["config"]["rank"] == 1
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def write_killed_at(step, path, state, metadata, exchange):
    """Run write_adapter in a forked child that dies (os._exit, like a kill) at its ``step``-th file-system
    call; return its exit code (0: it finished before reaching that step)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            calls = [0]

            def counted(fn):
                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os._exit(1)
                    return fn(*args, **kwargs)

                return wrapper

            for mod, name in ((os, "mkdir"), (os, "open"), (os, "fsync"), (os, "rename"), (os, "replace"), (shutil, "rmtree")):
                setattr(mod, name, counted(getattr(mod, name)))
            if hasattr(adapter_module, "_exchange"):
                adapter_module._exchange = counted(adapter_module._exchange) if exchange else (lambda a, b: False)
            write_adapter(path, state, metadata)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def files(path):
    return (path / CONFIG).read_bytes(), (path / WEIGHTS).read_bytes()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path, exchange):
    old_model, new_model = trained(), trained(rank=1, seed=5)
    new = adapter_state_dict(new_model), adapter_metadata(new_model, config_of(new_model))
    write_adapter(tmp_path / "reference", *new)
    new_files = files(tmp_path / "reference")
    problems = []
    for step in range(1, 40):
        parent = tmp_path / f"step{step}"
        save_adapter(old_model, parent / "adapter")
        old_files = files(parent / "adapter")
        code = write_killed_at(step, parent / "adapter", *new, exchange=exchange)
        assert code in (0, 1), code
        fresh = tiny_bert()
        load_adapter(fresh, parent / "adapter")  # repairs an interrupted swap first
        now = files(parent / "adapter")
        if now not in (old_files, new_files):
            problems.append(f"step {step}: a mix of the two adapters: config {'new' if now[0] == new_files[0] else 'old'}, "
                            f"weights {'new' if now[1] == new_files[1] else 'old'}")
        else:
            reference = new_model if now == new_files else old_model
            torch.testing.assert_close(logits(fresh), logits(reference), rtol=0, atol=0)
        save_adapter(new_model, parent / "adapter")  # the next save cleans up what the killed writer left
        left = sorted(set(os.listdir(parent)) - {"adapter"}) + sorted(set(os.listdir(parent / "adapter")) - {CONFIG, WEIGHTS})
        if left or files(parent / "adapter") != new_files:
            problems.append(f"step {step}: after the next save: left behind {left}")
        if code == 0:  # the writer got through every step
            break
    else:
        pytest.fail("the writer never finished")
    assert not problems, problems
    assert step > 5  # it was killed at several steps before that
