"""`rocoft-bench adapters`: what switching adapters and mixing them in one batch cost, RoCoFT vs PEFT LoRA.

Per model, RoCoFT adapters (``--mode``, ``--rank``, random rows, a different seed each) and PEFT LoRA r=8
adapters on the same target modules (every layer RoCoFT adapts, by exact name), each model with its own copy of
the same base weights; every delta / LoRA weight is random, not zero. Everything runs under ``torch.no_grad()``.

Swap: one switch from adapter A to B (timed as A -> B and B -> A alternately; median and min over every switch):

    rocoft-merged        swap_merged_adapter: W0's saved rows back, B's rows merged (r rows per matrix)
    rocoft-unmerged      set_adapter (a name change in each layer)
    reload               what a user without hot swap does: from_pretrained of the base + load_adapter (every
                         weight read once: from_pretrained maps safetensors lazily; the files in the page cache)
    peft-set-adapter     PeftModel.set_adapter (unmerged LoRA)
    peft-hotswap         peft.utils.hotswap.hotswap_adapter: B's weights read from its directory into A's place
    peft-hotswap-memory  hotswap_adapter_from_state_dict: the same with B's state dict already in memory
    peft-merged          unmerge_adapter + set_adapter + merge_adapter: PEFT's switch of a merged model

Mixed: one forward of a batch whose examples name their adapter (example i uses adapter i mod n, for n in
``--adapters``), as examples per second: ``rocoft_pl.mixed_adapters`` vs PEFT's ``model(..., adapter_names=...)``;
``base`` is the same forward with the adapters disabled. ``vs_peft``: examples/s over PEFT's with as many adapters.

Methods are timed interleaved (each round runs every method once, in a rotated order), so that drift of a shared
machine hits them alike; the reload runs ``--reload-repeats`` times after the rounds. Writes adapters_swap.csv,
adapters_mixed.csv and adapters.json (setup, both tables, every time, the issue's targets as ratios) into
``--output-dir``, rewritten atomically after each model. Each model is held twice (RoCoFT's and PEFT's copy of the
same weights): llama-1b-config needs about 11 GB of memory.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from rocoft_pl import (
    RoCoFTConfig,
    add_adapter,
    load_adapter,
    merge_rocoft,
    mixed_adapters,
    rocoft_layers,
    save_adapter,
    set_adapter,
    swap_merged_adapter,
    unmerge_rocoft,
)
from rocoft_pl.extras import require_extra
from rocoft_pl.multi_adapter import disable_adapter

from .adapter_models import MODELS, load_base, make_inputs, reloader
from .results import write_text_atomically

DEFAULT_MODELS = ("minilm", "smollm2", "roberta-base-config", "llama-1b-config")
LORA_RANK = 8
SWAP_METHODS = (
    "rocoft-merged", "rocoft-unmerged", "reload", "peft-set-adapter", "peft-hotswap", "peft-hotswap-memory",
    "peft-merged",
)


def adapter_name(i: int) -> str:
    return f"a{i}"


# --------------------------------------------------------------------------------------------- models
@torch.no_grad()
def _randomize(tensors: Sequence[torch.Tensor], seed: int, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=g) * scale)


def build_rocoft(base: nn.Module, count: int, mode: str, rank: int) -> nn.Module:
    """``base`` (in place) with ``count`` RoCoFT adapters a0, a1, ...: random rows (seed i) and random deltas."""
    for i in range(count):
        name = adapter_name(i)
        add_adapter(base, name, RoCoFTConfig(mode=mode, rank=rank, selection="random", seed=i, modules_to_save=[]))
        _randomize([d for layer in rocoft_layers(base).values() for d in layer.adapters[name].deltas.values()], 100 + i)
    set_adapter(base, adapter_name(0))
    return base


def build_peft(base: nn.Module, targets: Sequence[str], count: int) -> nn.Module:
    """``base`` (in place) as a PeftModel with ``count`` LoRA r=8 adapters a0, a1, ... on ``targets`` (exact
    module names), random A and B (``init_lora_weights=False``); a0 active."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=list(targets),
                        init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, config, adapter_name=adapter_name(0))
    for i in range(1, count):
        model.add_adapter(adapter_name(i), config)
    model.set_adapter(adapter_name(0))
    return model.eval()


# ----------------------------------------------------------------------------------------------- timing
def _rotated(items: Sequence[Any], i: int) -> list[Any]:
    k = i % len(items)
    return [*items[k:], *items[:k]]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class SwapMethod:
    """A switch between adapters a0 and a1: ``swap(name)`` is timed; ``enter`` / ``leave`` (untimed) put the model
    in the state the method needs (merged) and back (a0 active, unmerged)."""

    swap: Callable[[str], Any]
    enter: Callable[[], Any] = lambda: None
    leave: Callable[[], Any] = lambda: None


def rocoft_swaps(model: nn.Module) -> dict[str, SwapMethod]:
    return {
        "rocoft-merged": SwapMethod(lambda n: swap_merged_adapter(model, n), lambda: merge_rocoft(model),
                                    lambda: unmerge_rocoft(model)),
        "rocoft-unmerged": SwapMethod(lambda n: set_adapter(model, n)),
    }


def peft_swaps(model: nn.Module, directory: Path) -> dict[str, SwapMethod]:
    """PEFT's switches; the two adapters are saved into ``directory`` for ``hotswap_adapter``, which loads a
    saved adapter into the place of the loaded one (a0: the name stays)."""
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights

    a, b = adapter_name(0), adapter_name(1)
    model.save_pretrained(directory, selected_adapters=[a, b])  # a0 -> directory/a0, a1 -> directory/a1
    dirs = {a: directory / a, b: directory / b}
    states = {
        n: _insert_adapter_name_into_state_dict(load_peft_weights(str(d), device="cpu"), adapter_name=a, parameter_prefix="lora_")
        for n, d in dirs.items()
    }
    config = model.peft_config[a]

    def merged_switch(n: str) -> None:
        model.unmerge_adapter()
        model.set_adapter(n)
        model.merge_adapter()

    def unmerge() -> None:
        model.unmerge_adapter()
        model.set_adapter(a)

    return {
        "peft-set-adapter": SwapMethod(model.set_adapter),
        "peft-hotswap": SwapMethod(lambda n: hotswap_adapter(model, str(dirs[n]), adapter_name=a, torch_device="cpu")),
        "peft-hotswap-memory": SwapMethod(lambda n: hotswap_adapter_from_state_dict(model, states[n], a, config)),
        "peft-merged": SwapMethod(merged_switch, model.merge_adapter, unmerge),
    }


@torch.no_grad()
def time_swaps(methods: dict[str, SwapMethod], repeats: int) -> dict[str, list[float]]:
    """Seconds per switch: each round, every method (rotated order) switches a0 -> a1 and a1 -> a0, after one
    untimed round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats + 1):
        for name in _rotated(list(methods), i):
            method = methods[name]
            method.enter()
            pair = [_timed(lambda: method.swap(adapter_name(1))), _timed(lambda: method.swap(adapter_name(0)))]
            method.leave()
            if i > 0:
                times[name].extend(pair)
    return times


@torch.no_grad()
def touch_weights(model: nn.Module) -> float:
    """Read one value per 4 KiB of every parameter and buffer. ``from_pretrained`` maps safetensors files lazily,
    so without this a reload would be timed before the weights are read (the first forward reads them)."""
    step = max(1, 4096 // 4)
    total = 0.0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and t.numel():
            total += float(t.detach().reshape(-1)[::step].sum())
    return total


def time_reload(load: Callable[[], nn.Module], adapter_dir: Path, repeats: int) -> list[float]:
    """Seconds to load the base and the adapter anew, every weight read once (the model is dropped after each)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model = load()
        load_adapter(model, adapter_dir)
        touch_weights(model)
        times.append(time.perf_counter() - start)
        del model
        gc.collect()
    return times


def mixed_names(batch_size: int, count: int) -> list[str]:
    """Example i uses adapter i mod ``count``."""
    return [adapter_name(i % count) for i in range(batch_size)]


@torch.no_grad()
def time_mixed(
    rocoft: nn.Module, peft: nn.Module, inputs: dict[str, torch.Tensor], counts: Sequence[int], repeats: int,
) -> dict[tuple[str, int], list[float]]:
    """Seconds per forward of ``inputs``: base (adapters disabled), and per adapter count RoCoFT's and PEFT's
    mixed batches; interleaved over ``repeats`` rounds after one untimed round."""
    size = inputs["input_ids"].shape[0]

    def base() -> Any:
        with disable_adapter(rocoft):
            return rocoft(**inputs)

    def ours(count: int) -> Callable[[], Any]:
        def run() -> Any:
            with mixed_adapters(rocoft, mixed_names(size, count)):
                return rocoft(**inputs)
        return run

    def theirs(count: int) -> Callable[[], Any]:
        return lambda: peft(**inputs, adapter_names=mixed_names(size, count))

    fns: dict[tuple[str, int], Callable[[], Any]] = {("base", 0): base}
    for count in counts:
        fns[("rocoft", count)] = ours(count)
        fns[("peft-lora", count)] = theirs(count)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in fns}
    for i in range(repeats + 1):
        for key in _rotated(list(fns), i):
            t = _timed(fns[key])
            if i > 0:
                times[key].append(t)
    return times


# ------------------------------------------------------------------------------------------------ rows
def swap_rows(model: str, times: dict[str, list[float]]) -> list[dict[str, Any]]:
    merged = statistics.median(times["rocoft-merged"])
    rows = []
    for method in [m for m in SWAP_METHODS if m in times]:
        median = statistics.median(times[method])
        rows.append({"model": model, "method": method, "median_ms": 1000 * median, "min_ms": 1000 * min(times[method]),
                     "swaps": len(times[method]), "vs_rocoft_merged": median / merged})
    return rows


def mixed_rows(
    model: str, times: dict[tuple[str, int], list[float]], batch_size: int, seq_len: int,
) -> list[dict[str, Any]]:
    peft = {count: statistics.median(t) for (method, count), t in times.items() if method == "peft-lora"}
    rows = []
    for (method, count), t in times.items():
        median = statistics.median(t)
        rows.append({"model": model, "method": method, "adapters": count, "batch_size": batch_size, "seq_len": seq_len,
                     "median_ms": 1000 * median, "examples_per_s": batch_size / median,
                     "vs_peft": peft[count] / median if count in peft else float("nan")})
    return rows


def targets(swap: list[dict[str, Any]], mixed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios (>= limit is met): merged swap >= 100x faster than reloading and faster than
    PEFT's hot swap; RoCoFT's mixed batch of the most adapters measured (the issue: 16) >= PEFT's throughput."""
    checks = []
    by = {r["method"]: r["median_ms"] for r in swap}
    for other, limit in (("reload", 100.0), ("peft-hotswap", 1.0), ("peft-hotswap-memory", 1.0), ("peft-merged", 1.0)):
        if other in by:
            ratio = by[other] / by["rocoft-merged"]
            checks.append({"target": f"{other} / rocoft-merged swap time", "value": ratio, "limit": limit, "ok": ratio >= limit})
    ours = [r for r in mixed if r["method"] == "rocoft"]
    if ours:
        most = max(ours, key=lambda r: r["adapters"])
        checks.append({"target": f"rocoft / peft-lora mixed-batch examples/s, {most['adapters']} adapters",
                       "value": most["vs_peft"], "limit": 1.0, "ok": most["vs_peft"] >= 1.0})
    return checks


# ------------------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class Settings:
    counts: tuple[int, ...] = (1, 4, 16)
    mode: str = "row"
    rank: int = 3
    batch_size: int = 16
    seq_len: int = 32
    swap_repeats: int = 10
    reload_repeats: int = 3
    mixed_repeats: int = 5


def run_model(name: str, settings: Settings, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every measurement on model ``name``: the swap and mixed rows, the targets and the raw times."""
    base = load_base(name, overrides)
    count = max(2, *settings.counts)
    inputs = make_inputs(base, settings.batch_size, settings.seq_len)
    with reloader(name, base) as load, tempfile.TemporaryDirectory(prefix="rocoft-adapters-bench-") as tmp:
        peft = copy.deepcopy(base)
        rocoft = build_rocoft(base, count, settings.mode, settings.rank)
        targets_ = list(rocoft_layers(rocoft))
        peft = build_peft(peft, targets_, count)
        save_adapter(rocoft, Path(tmp) / "rocoft", adapter_name=adapter_name(1))
        swap = time_swaps({**rocoft_swaps(rocoft), **peft_swaps(peft, Path(tmp) / "peft")}, settings.swap_repeats)
        mixed = time_mixed(rocoft, peft, inputs, settings.counts, settings.mixed_repeats)
        del peft
        gc.collect()
        swap["reload"] = time_reload(load, Path(tmp) / "rocoft", settings.reload_repeats)
    swap_table = swap_rows(name, swap)
    mixed_table = mixed_rows(name, mixed, settings.batch_size, settings.seq_len)
    return {
        "model": name,
        "base_params": sum(p.numel() for n, p in rocoft.named_parameters() if ".adapters." not in n),
        "rocoft_layers": len(targets_),
        "swap": swap_table,
        "mixed": mixed_table,
        "targets": targets(swap_table, mixed_table),
        "swap_times_s": swap,
        "mixed_times_s": {f"{method}-{count}": t for (method, count), t in mixed.items()},
    }


SWAP_COLUMNS = ["model", "method", "median_ms", "min_ms", "swaps", "vs_rocoft_merged"]
MIXED_COLUMNS = ["model", "method", "adapters", "batch_size", "seq_len", "median_ms", "examples_per_s", "vs_peft"]


def write_results(out: Path, setup: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """adapters_swap.csv, adapters_mixed.csv and adapters.json, each replaced atomically."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    swap = pd.DataFrame([r for res in results for r in res["swap"]], columns=SWAP_COLUMNS)
    mixed = pd.DataFrame([r for res in results for r in res["mixed"]], columns=MIXED_COLUMNS)
    write_text_atomically(out / "adapters_swap.csv", swap.to_csv(index=False))
    write_text_atomically(out / "adapters_mixed.csv", mixed.to_csv(index=False))
    write_text_atomically(out / "adapters.json", json.dumps({"setup": setup, "models": results}, indent=2) + "\n")


def run(
    models: Sequence[str], settings: Settings, output_dir: Optional[Path] = None,
    overrides: Optional[dict[str, Any]] = None, threads: Optional[int] = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every model in turn; the files are rewritten after each model, so a long run keeps what it has."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if not settings.counts or min(settings.counts) < 1 or settings.batch_size < max(settings.counts):
        raise ValueError(f"adapter counts must be >= 1 and at most the batch size ({settings.batch_size}), got {settings.counts}")
    if threads is not None:
        torch.set_num_threads(threads)
    import peft

    setup = {**vars(settings), "counts": list(settings.counts), "lora_rank": LORA_RANK, "threads": torch.get_num_threads(),
             "device": "cpu", "device_name": platform.processor() or platform.machine(), "torch": torch.__version__,
             "peft": peft.__version__, "model_config": overrides or {}}
    results: list[dict[str, Any]] = []
    for name in models:
        results.append(run_model(name, settings, overrides))
        gc.collect()
        if output_dir is not None:
            write_results(Path(output_dir), setup, results)
    return setup, results


# ---------------------------------------------------------------------------------------------- output
def format_tables(results: list[dict[str, Any]]) -> str:
    import pandas as pd

    swap = pd.DataFrame([r for res in results for r in res["swap"]], columns=SWAP_COLUMNS)
    mixed = pd.DataFrame([r for res in results for r in res["mixed"]], columns=MIXED_COLUMNS)
    swap = swap.assign(median_ms=swap.median_ms.map(lambda v: f"{v:,.3f}"), min_ms=swap.min_ms.map(lambda v: f"{v:,.3f}"),
                       vs_rocoft_merged=swap.vs_rocoft_merged.map(lambda v: f"{v:,.1f}x"))
    mixed = mixed.assign(median_ms=mixed.median_ms.map(lambda v: f"{v:,.1f}"),
                         examples_per_s=mixed.examples_per_s.map(lambda v: f"{v:,.1f}"),
                         vs_peft=mixed.vs_peft.map(lambda v: "" if v != v else f"{v:.2f}"))
    checks = "\n".join(f"{'met ' if c['ok'] else 'MISS'}  {r['model']}: {c['target']}: {c['value']:,.2f} (>= {c['limit']:g})"
                       for r in results for c in r["targets"])
    return f"Swap A -> B\n\n{swap.to_markdown(index=False)}\n\nMixed batches\n\n{mixed.to_markdown(index=False)}\n\nTargets\n{checks}"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "adapters",
        help="adapter swap time (merged, unmerged, reload, PEFT hot swap) and mixed-batch throughput vs PEFT LoRA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma list of: {', '.join(MODELS)}")
    parser.add_argument("--model-config", default=None, metavar="JSON",
                        help='overrides of the shaped configs, e.g. \'{"num_hidden_layers": 4}\'')
    parser.add_argument("--adapters", default="1,4,16", help="adapter counts of the mixed batches (comma list)")
    parser.add_argument("--mode", default="row", choices=("row", "column", "both"))
    parser.add_argument("--rank", type=int, default=3, help="RoCoFT rows / columns per matrix")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--swap-repeats", type=int, default=10, help="rounds of swaps (each: A -> B and B -> A per method)")
    parser.add_argument("--reload-repeats", type=int, default=3)
    parser.add_argument("--mixed-repeats", type=int, default=5, help="rounds of mixed-batch forwards")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output-dir", default="runs/adapters", help="writes adapters_swap.csv, adapters_mixed.csv, adapters.json")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    for package in ("peft", "pandas"):  # a missing one names its extra before any model loads
        require_extra(package, "bench")

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    hf_logging.disable_progress_bar()  # save_pretrained / from_pretrained bars, once per reload
    # PEFT's save_pretrained looks for a config.json next to a GGUF base (SmolLM2) to check the vocabulary: not ours.
    warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    settings = Settings(
        counts=tuple(int(c) for c in args.adapters.split(",") if c.strip()), mode=args.mode, rank=args.rank,
        batch_size=args.batch_size, seq_len=args.seq_len, swap_repeats=args.swap_repeats,
        reload_repeats=args.reload_repeats, mixed_repeats=args.mixed_repeats,
    )
    overrides = json.loads(args.model_config) if args.model_config else None
    try:
        setup, results = run(models, settings, Path(args.output_dir), overrides, args.threads)
    except ValueError as e:
        raise SystemExit(f"rocoft-bench adapters: {e}") from None
    print(f"\nRoCoFT {settings.mode} r={settings.rank} vs PEFT LoRA r={LORA_RANK}, CPU, {setup['threads']} threads; "
          f"mixed batches of {settings.batch_size} x {settings.seq_len} tokens\n")
    print(format_tables(results))
    print(f"\nwrote {Path(args.output_dir) / 'adapters_swap.csv'}, adapters_mixed.csv and adapters.json")
    return 0
