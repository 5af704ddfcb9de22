"""lm-evaluation-harness scoring (`rocoft-bench lm-eval`): a RoCoFT model in memory, or a saved checkpoint.

In memory (one process): the base model is loaded, the adapter loaded onto it (and merged, by default: the
same numbers, no RoCoFT overhead at inference), and lm-eval's ``HFLM(pretrained=<model>, tokenizer=<tok>)``
scores it. By path (multi-GPU): the merged model is written with ``save_pretrained`` (``--save-merged``) and
``HFLM(pretrained=<dir>, parallelize=True)`` splits it over the visible GPUs; for data-parallel scoring
run ``accelerate launch -m lm_eval --model hf --model_args pretrained=<dir> --tasks ...`` on that directory.
Device and dtype default to ``auto`` (``resolve_device_dtype``): the GPU when there is one, in bfloat16 where
it supports it (float16 otherwise), else the CPU in float32; explicit values win.

Tasks default to the paper's commonsense set plus GSM8K (``DEFAULT_TASKS``); they read hub datasets. Local
task YAMLs (``dataset_path: json`` + ``dataset_kwargs.data_files``, see tests/fixtures/reasoning/lm_eval/) are
given with ``--include``: relative data file paths are resolved against the YAML's own directory.

Every task's score goes into the benchmark results store (benchmark/results.py) as one record with
``protocol: loglikelihood`` (lm-eval ranks the options by log-likelihood; GSM8K is generated but scored
by lm-eval's own extraction) so that the leaderboard shows it beside the generate-and-parse numbers of the
causal-LM module (``protocol: generate``): the protocol is in the record and in the method label. The
record keeps every metric lm-eval returned under ``<metric>/<filter>`` (``exact_match/strict-match``) and
the primary one as ``accuracy``; a task whose metrics are none of the usual ones (``PRIMARY``,
``FALLBACK_PRIMARY``: a regex filter of its own, say) is kept, with its first metric as the primary and a
warning naming it. The printed table lists every metric of every task with its filter name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import yaml

from rocoft_pl.extras import require_extra

DEFAULT_TASKS = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "gsm8k")
# lm-eval task name -> the dataset name used by tasks.reasoning and the generate-and-parse results.
TASK_NAMES = {"social_iqa": "siqa", "arc_easy": "arc-e", "arc_challenge": "arc-c"}
# The metric reported per task (lm-eval keys "<metric>,<filter>"); the first one present wins.
PRIMARY = {
    "hellaswag": ("acc_norm,none", "acc,none"),
    "arc_challenge": ("acc_norm,none", "acc,none"),
    "arc_easy": ("acc_norm,none", "acc,none"),
    "openbookqa": ("acc_norm,none", "acc,none"),
    "piqa": ("acc_norm,none", "acc,none"),
    "gsm8k": ("exact_match,flexible-extract", "exact_match,strict-match"),
}
FALLBACK_PRIMARY = ("acc,none", "exact_match,none", "acc_norm,none")
PROTOCOLS = ("loglikelihood", "generate")
DTYPES = ("float32", "bfloat16", "float16")


def resolve_device_dtype(device: Optional[str] = "auto", dtype: Optional[str] = "auto") -> tuple[str, str]:
    """``(device, dtype)`` for scoring. ``auto`` device: ``cuda`` when a GPU is visible, else ``cpu``; ``auto``
    dtype: ``bfloat16`` on a GPU that supports it natively, ``float16`` on other GPUs, ``float32`` off the GPU.
    Explicit values are kept (a dtype must be one of ``DTYPES``)."""
    import torch

    device = device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or "auto"
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, got {dtype!r}")
    return device, dtype


# -- local tasks -------------------------------------------------------------------------------------------
def _yaml_files(paths: Iterable[Union[str, Path]]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.yaml"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"lm-eval include path not found: {p}")
    return files


def prepare_include_dir(paths: Iterable[Union[str, Path]], out_dir: Union[str, Path]) -> Path:
    """Copy task YAMLs into ``out_dir`` with relative ``dataset_kwargs.data_files`` made absolute (relative
    to the YAML's directory), so a task folder works from any working directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(_yaml_files(paths)):
        text = src.read_text()
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError:
            spec = None  # lm-eval's own YAML tags (!function): copy as is
        if isinstance(spec, dict) and isinstance(spec.get("dataset_kwargs"), dict) and "data_files" in spec["dataset_kwargs"]:
            spec["dataset_kwargs"]["data_files"] = _absolute(spec["dataset_kwargs"]["data_files"], src.parent)
            text = yaml.safe_dump(spec, sort_keys=False)
        (out / f"{i:03d}_{src.name}").write_text(text)
    return out


def _absolute(files: Any, base: Path) -> Any:
    if isinstance(files, str):
        return files if "://" in files or Path(files).is_absolute() else str((base / files).resolve())
    if isinstance(files, list):
        return [_absolute(f, base) for f in files]
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    return files


def task_manager(include: Optional[Sequence[Union[str, Path]]], include_defaults: bool, work_dir: Path) -> Any:
    TaskManager = require_extra("lm_eval.tasks", "bench").TaskManager

    if not include:
        return TaskManager()
    return TaskManager(include_path=str(prepare_include_dir(include, work_dir)), include_defaults=include_defaults)


# -- scoring -----------------------------------------------------------------------------------------------
def evaluate(
    lm: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    include: Optional[Sequence[Union[str, Path]]] = None,
    include_defaults: Optional[bool] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[Union[int, float]] = None,
    bootstrap_iters: int = 0,
    seed: int = 1234,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on an LM object; returns its results dict (``results[task][metric]``).
    ``include_defaults`` (None: only when a task is not found in ``include``) indexes lm-eval's built-in tasks
    (about 10 s)."""
    simple_evaluate = require_extra("lm_eval", "bench").simple_evaluate

    with tempfile.TemporaryDirectory(prefix="rocoft-lm-eval-") as tmp:
        if include and include_defaults is None:
            local = {_task_name(f) for f in _yaml_files(include)}
            include_defaults = not set(tasks) <= local
        manager = task_manager(include, bool(include_defaults) if include else True, Path(tmp))
        out = simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters,
            task_manager=manager, log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if out is None:  # non-zero ranks of a data-parallel run
        return {}
    return out


def _task_name(path: Path) -> str:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return ""
    return str(spec.get("task", "")) if isinstance(spec, dict) else ""


def hflm_in_memory(model: Any, tokenizer: Any, batch_size: Union[int, str] = 8, device: str = "cpu",
                   max_length: Optional[int] = None) -> Any:
    """lm-eval's HFLM around a model object (single process; RoCoFT layers or merged, either works). The model
    is moved to ``device`` first: HFLM scores a model object where it lies and ignores its own ``device``."""
    HFLM = require_extra("lm_eval.models.huggingface", "bench").HFLM

    model.to(device).eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)


def hflm_from_path(path: Union[str, Path], batch_size: Union[int, str] = 8, device: Optional[str] = None,
                   parallelize: bool = False, dtype: str = "auto", **kwargs: Any) -> Any:
    """HFLM over a saved checkpoint; ``parallelize=True`` splits it across the visible GPUs."""
    HFLM = require_extra("lm_eval.models.huggingface", "bench").HFLM

    if parallelize:
        return HFLM(pretrained=str(path), batch_size=batch_size, parallelize=True, dtype=dtype, **kwargs)
    return HFLM(pretrained=str(path), batch_size=batch_size, device=device or "cpu", dtype=dtype, **kwargs)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def task_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Every numeric metric of one task's lm-eval results, keyed ``<metric>,<filter>`` as lm-eval returns
    them, sorted by key: no standard errors (``*_stderr,<filter>``), no ``alias``."""
    return {k: float(v) for k, v in sorted(metrics.items()) if _number(v) and "_stderr" not in k}


def primary_metric(task: str, metrics: dict[str, Any]) -> tuple[Optional[str], Optional[float]]:
    """The reported metric: the first of ``PRIMARY[task]`` and ``FALLBACK_PRIMARY`` present; else the first
    metric by key (a task with only a named filter, e.g. ``exact_match,get-answer``), with a warning on
    stderr; (None, None) when the task has no numeric metric at all."""
    for key in (*PRIMARY.get(task, ()), *FALLBACK_PRIMARY):
        if _number(metrics.get(key)):
            return key, float(metrics[key])
    found = task_metrics(metrics)
    if not found:
        return None, None
    key = next(iter(found))
    print(f"warning: lm-eval task {task!r} has none of the usual metrics "
          f"({', '.join((*PRIMARY.get(task, ()), *FALLBACK_PRIMARY))}); its primary metric is {key!r}", file=sys.stderr)
    return key, found[key]


def result_records(
    results: dict[str, Any],
    model: str,
    method: str = "rocoft",
    method_label: Optional[str] = None,
    method_params: Optional[dict[str, Any]] = None,
    seed: int = 0,
    protocol: str = "loglikelihood",
    adapter_params: Optional[int] = None,
    extra: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """One results-store record per task: ``metrics.accuracy`` (the primary lm-eval metric, a fraction)
    plus every numeric lm-eval metric, ``protocol`` and a method label that names it."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    label = f"{method_label or method} [{protocol}]"
    records = []
    config = results.get("config", {}) if isinstance(results.get("config"), dict) else {}
    for task, metrics in results.get("results", {}).items():
        key, value = primary_metric(task, metrics)
        if key is None:
            print(f"warning: lm-eval task {task!r} returned no numeric metric (keys: {sorted(metrics)}); not recorded",
                  file=sys.stderr)
            continue
        name = TASK_NAMES.get(task, task)
        numeric = {k.replace(",", "/"): v for k, v in task_metrics(metrics).items()}
        payload = json.dumps([model, method, method_params, config.get("model_args"), results.get("n-shot", {}).get(task)],
                             sort_keys=True, default=str)
        records.append({
            "cell_id": f"{model}|{name}|{label}|seed={seed}",
            "model": model, "task": name, "method": method, "method_label": label,
            "method_params": dict(method_params or {}), "seed": seed, "status": "ok", "error": None,
            "metrics": {"accuracy": value, **numeric}, "primary_metrics": ["accuracy"],
            "protocol": protocol, "lm_eval_task": task, "lm_eval_metric": key,
            "n_samples": (results.get("n-samples", {}).get(task) or {}).get("effective"),
            "num_fewshot": results.get("n-shot", {}).get(task), "adapter_params": adapter_params,
            "config_hash": hashlib.sha256(payload.encode()).hexdigest()[:16],
            **(extra or {}),
        })
    return records


def table_lines(results: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str]:
    """The printed table: one line per metric of every recorded task (``<metric>,<filter>``, its value and
    standard error as lm-eval returned them), the primary metric first and starred."""
    lines = [f"{'task':<14} {'metric,filter':<36} {'value':>8} {'stderr':>8}  n"]
    for r in records:
        metrics = results.get("results", {}).get(r["lm_eval_task"], {})
        keys = [r["lm_eval_metric"], *(k for k in task_metrics(metrics) if k != r["lm_eval_metric"])]
        for i, key in enumerate(keys):
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            err = f"{stderr:8.4f}" if _number(stderr) else f"{'-':>8}"
            label = key + (" *" if i == 0 else "")
            n = f"  {r['n_samples']}" if i == 0 and r.get("n_samples") is not None else ""
            lines.append(f"{r['task']:<14} {label:<36} {float(metrics.get(key, r['metrics']['accuracy'])):8.4f} {err}{n}")
    lines.append("* the primary metric (metrics.accuracy in the results store)")
    return lines


def generate_records(metrics: dict[str, float], model: str, method: str = "rocoft", method_label: Optional[str] = None,
                     seed: int = 0, adapter_params: Optional[int] = None, extra: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Per-dataset records from the causal-LM module's generate-and-parse metrics (``val/<name>/accuracy``,
    as ``trainer.validate`` returns them), with ``protocol: generate``, for the same results store."""
    label = f"{method_label or method} [generate]"
    records = []
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != "accuracy":
            continue
        task = parts[1]
        count = metrics.get(f"{parts[0]}/{task}/count")
        records.append({
            "cell_id": f"{model}|{task}|{label}|seed={seed}", "model": model, "task": task, "method": method,
            "method_label": label, "method_params": {}, "seed": seed, "status": "ok", "error": None,
            "metrics": {"accuracy": float(value)}, "primary_metrics": ["accuracy"], "protocol": "generate",
            "n_samples": int(count) if count is not None else None, "adapter_params": adapter_params,
            "config_hash": hashlib.sha256(json.dumps([model, method, key]).encode()).hexdigest()[:16], **(extra or {}),
        })
    return records


def generate_records_of_cell(record: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """For a finished grid cell of the causal-LM module: its per-dataset generate-and-parse accuracies as
    ``protocol: generate`` records (one task column per dataset, beside lm-eval's); [] for other cells."""
    class_path = str((config.get("model") or {}).get("class_path", ""))
    if record.get("status") != "ok" or not class_path.endswith("CausalLMModule"):
        return []
    return generate_records(record["metrics"], model=record["model"], method=record["method"],
                            method_label=record.get("method_label"), seed=record.get("seed", 0),
                            adapter_params=record.get("adapter_params"), extra={"source_cell": record["cell_id"]})


def record_results(path: Union[str, Path], records: Iterable[dict[str, Any]]) -> None:
    from .results import upsert_result

    for record in records:
        upsert_result(path, record)


# -- building the model ------------------------------------------------------------------------------------
def load_model(model: str, gguf_file: Optional[str] = None, adapter: Optional[str] = None, merge: bool = True,
               dtype: Optional[str] = None) -> tuple[Any, Any, Optional[int]]:
    """(model, tokenizer, adapter parameter count): the base model with the adapter loaded (and merged)."""
    import torch

    from rocoft_pl import load_adapter, merge_rocoft, unload_rocoft
    from rocoft_pl.modules.causal_lm import load_causal_lm, load_tokenizer

    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)} if dtype else {}
    net = load_causal_lm(model, gguf_file, **kwargs)
    tokenizer = load_tokenizer(model, gguf_file)
    params = None
    if adapter:
        report = load_adapter(net, adapter)
        params = report.trainable_params
        if merge:
            unload_rocoft(merge_rocoft(net))  # plain layers: save_pretrained (--save-merged) writes a plain checkpoint
    return net.eval(), tokenizer, params


def run(args: argparse.Namespace) -> int:
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else list(DEFAULT_TASKS)
    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"lm-eval: device {device}, dtype {dtype}" + (" (parallelize: the visible GPUs)" if args.parallelize else ""))
    if args.parallelize:
        path = args.model
        if args.adapter or args.gguf_file:
            if not args.save_merged:
                raise SystemExit("--parallelize with --adapter/--gguf-file needs --save-merged DIR (a full HF checkpoint)")
            net, tok, params = load_model(args.model, args.gguf_file, args.adapter, merge=True, dtype=dtype)
            net.save_pretrained(args.save_merged)
            tok.save_pretrained(args.save_merged)
            path = args.save_merged
        else:
            from rocoft_pl.modules.classification import resolve_pretrained

            path, params = resolve_pretrained(args.model), None
        lm = hflm_from_path(path, batch_size=args.batch_size, parallelize=True, dtype=dtype)
    else:
        net, tok, params = load_model(args.model, args.gguf_file, args.adapter, merge=not args.no_merge, dtype=dtype)
        if args.save_merged:
            net.save_pretrained(args.save_merged)
            tok.save_pretrained(args.save_merged)
        lm = hflm_in_memory(net, tok, batch_size=args.batch_size, device=device, max_length=args.max_length)
    results = evaluate(lm, tasks, include=args.include, num_fewshot=args.num_fewshot, limit=args.limit,
                       bootstrap_iters=args.bootstrap_iters, seed=args.seed)
    if not results:
        return 0
    records = result_records(
        results, model=args.model_label or Path(args.model).name, method=args.method,
        method_label=args.method_label, seed=args.seed, protocol="loglikelihood", adapter_params=params,
        extra={"adapter": args.adapter, "limit": args.limit},
    )
    print("\n".join(table_lines(results, records)))
    if args.results:
        record_results(args.results, records)
        print(f"{len(records)} record(s) written to {args.results}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"results": results.get("results"), "n-shot": results.get("n-shot")},
                                                indent=2, default=str))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("lm-eval", help="score a (RoCoFT) causal LM with lm-evaluation-harness (log-likelihood)")
    p.add_argument("--model", required=True, help="base model: hub id, directory, or pkg:<module>")
    p.add_argument("--gguf-file", help="a GGUF file in the model directory (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--adapter", help="a RoCoFT adapter directory to load onto the base model")
    p.add_argument("--no-merge", action="store_true", help="score with RoCoFT layers instead of merged weights")
    p.add_argument("--save-merged", help="also write the merged full HF checkpoint here")
    p.add_argument("--tasks", help=f"comma-separated lm-eval tasks (default: {','.join(DEFAULT_TASKS)})")
    p.add_argument("--include", nargs="*", help="local task YAML files or folders (offline tasks)")
    p.add_argument("--limit", type=float, help="examples per task (an int) or a fraction")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", default=8, help="int or 'auto'")
    p.add_argument("--max-length", type=int)
    p.add_argument("--device", default="auto", help="auto (default: cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="weights dtype; auto (default): bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU")
    p.add_argument("--parallelize", action="store_true", help="score a saved checkpoint split across GPUs")
    p.add_argument("--bootstrap-iters", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", help="results JSONL to add records to (e.g. runs/bench/table2/results.jsonl)")
    p.add_argument("--model-label", help="the model name in the results (default: the model path's last part)")
    p.add_argument("--method", default="rocoft", help="method kind for the results (rocoft-row, full, lora ...)")
    p.add_argument("--method-label", help="method label in the leaderboard (the protocol is appended)")
    p.add_argument("--output", help="also write lm-eval's results JSON here")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    if args.limit is not None and float(args.limit).is_integer():
        args.limit = int(args.limit)
    if isinstance(args.batch_size, str) and args.batch_size.isdigit():
        args.batch_size = int(args.batch_size)
    return run(args)


__all__ = [
    "DEFAULT_TASKS", "DTYPES", "PROTOCOLS", "evaluate", "hflm_from_path", "hflm_in_memory", "load_model", "prepare_include_dir",
    "generate_records", "generate_records_of_cell", "primary_metric", "record_results", "resolve_device_dtype",
    "result_records", "table_lines", "task_metrics",
]
