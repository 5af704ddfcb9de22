"""Paper-style leaderboards from a results file: method, #TTPs, one metric per task, average.

Each cell of the table aggregates the seeds of (model, task, method) with mean or median and shows the
standard deviation; per task column the best value is bold and the second underlined (higher is better:
every task metric here is an accuracy, F1, correlation, EM or ROUGE). Tables go to Markdown, CSV and
HTML; plots (PNG) show the metric against trainable parameters, time and memory per method, and a rank
sweep.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

from rocoft_pl.extras import require_extra

from .results import read_results

pd = require_extra("pandas", "bench")

SCALE_100 = ("accuracy", "f1", "mcc", "pearson", "spearman", "exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum")


def results_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per successful cell, with ``score`` = its first primary metric (x100 for [0,1] metrics)."""
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        primaries = r.get("primary_metrics") or sorted(r.get("metrics", {}))[:1]
        values = [_as_percent(m, r["metrics"][m]) for m in primaries if m in r.get("metrics", {})]
        if not values:
            continue
        rows.append(
            {
                "model": r["model"],
                "task": r["task"],
                "method": r.get("method_label") or r["method"],
                "seed": r.get("seed"),
                "adapter_params": r.get("adapter_params"),
                "score": values[0],
                "scores": values,
                "train_time_per_epoch_s": r.get("train_time_per_epoch_s"),
                "peak_memory_bytes": r.get("peak_memory_bytes"),
                "rank": (r.get("method_params") or {}).get("rank", (r.get("method_params") or {}).get("r")),
                "base_method": r["method"],
            }
        )
    return pd.DataFrame(rows)


def _as_percent(name: str, value: float) -> float:
    key = name.split("/")[-1]
    return 100.0 * value if key in SCALE_100 and abs(value) <= 1.0 else value


def format_params(n: Any) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 1e6:.3f}M" if n >= 10_000 else f"{int(n):,}"


def aggregate(frame: pd.DataFrame, statistic: str = "mean") -> pd.DataFrame:
    """(model, method) rows x task columns: the statistic over seeds of every primary metric, and std."""
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be mean or median, got {statistic!r}")
    rows = []
    for (model, task, method), g in frame.groupby(["model", "task", "method"], sort=False):
        per_metric = list(zip(*g["scores"]))
        centre = [float(getattr(pd.Series(v), statistic)()) for v in per_metric]
        std = [float(pd.Series(v).std(ddof=1)) if len(v) > 1 else 0.0 for v in per_metric]
        rows.append(
            {
                "model": model, "task": task, "method": method, "value": centre[0], "values": centre,
                "std": std, "seeds": len(g), "adapter_params": g["adapter_params"].iloc[0],
            }
        )
    return pd.DataFrame(rows)


def leaderboard(frame: pd.DataFrame, statistic: str = "mean") -> dict[str, pd.DataFrame]:
    """Per model: a numeric table (method rows, task columns, Avg.) used for ranking and CSV."""
    agg = aggregate(frame, statistic)
    boards = {}
    for model, g in agg.groupby("model", sort=False):
        table = g.pivot(index="method", columns="task", values="value")
        table = table.reindex(index=list(dict.fromkeys(g["method"])), columns=list(dict.fromkeys(g["task"])))
        table["Avg."] = table.mean(axis=1, skipna=False)
        table.insert(0, "#TTPs", g.groupby("method", sort=False)["adapter_params"].first().reindex(table.index))
        boards[model] = table
    return boards


def _ranks(column: pd.Series) -> dict[Any, int]:
    """1 for the best, 2 for the second best value (ties share)."""
    distinct = sorted(column.dropna().unique(), reverse=True)
    return {idx: distinct.index(v) + 1 for idx, v in column.dropna().items() if distinct.index(v) < 2}


def render(frame: pd.DataFrame, statistic: str = "mean", fmt: str = "markdown") -> str:
    """The leaderboard text: 'markdown' (**best**, <u>second</u>) or 'html' (<b>, <u>)."""
    agg = aggregate(frame, statistic)
    bold, under = (("**", "**"), ("<u>", "</u>")) if fmt == "markdown" else (("<b>", "</b>"), ("<u>", "</u>"))
    out = []
    for model, table in leaderboard(frame, statistic).items():
        tasks = [c for c in table.columns if c not in ("#TTPs",)]
        cells = {}
        for task in tasks:
            ranks = _ranks(table[task])
            for method in table.index:
                v = table.at[method, task]
                if pd.isna(v):
                    text = "-"
                elif task == "Avg.":
                    text = f"{v:.2f}"
                else:
                    row = agg[(agg.model == model) & (agg.task == task) & (agg.method == method)].iloc[0]
                    text = "/".join(f"{x:.2f}" for x in row["values"])
                    if row["seeds"] > 1:
                        text += " ± " + "/".join(f"{s:.2f}" for s in row["std"])
                mark = {1: bold, 2: under}.get(ranks.get(method))
                cells[(method, task)] = f"{mark[0]}{text}{mark[1]}" if mark and text != "-" else text
        header = ["Method", "#TTPs", *tasks]
        body = [[m, format_params(table.at[m, "#TTPs"]), *(cells[(m, t)] for t in tasks)] for m in table.index]
        if fmt == "markdown":
            lines = [f"### {model} ({statistic} over seeds)", "", "| " + " | ".join(header) + " |"]
            lines.append("|" + "|".join(["---"] * len(header)) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in body]
            out.append("\n".join(lines))
        else:
            head = "".join(f"<th>{h}</th>" for h in header)
            rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
            out.append(f"<h3>{model} ({statistic} over seeds)</h3>\n<table><tr>{head}</tr>{rows}</table>")
    return "\n\n".join(out) + "\n"


def plots(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Metric vs trainable parameters, time and memory per method, and the rank sweep, as PNG files."""
    matplotlib = require_extra("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    per_method = frame.groupby(["task", "method"], sort=False).agg(
        score=("score", "mean"), params=("adapter_params", "first"),
        time=("train_time_per_epoch_s", "mean"), memory=("peak_memory_bytes", "mean"),
    ).reset_index()

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, g in per_method.groupby("task", sort=False):
        ax.scatter(g["params"], g["score"], label=task)
        for _, row in g.iterrows():
            ax.annotate(row["method"], (row["params"], row["score"]), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (adapter, log)", ylabel="score", title="Score vs trainable parameters")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "score_vs_params.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    means = per_method.groupby("method", sort=False)[["time", "memory"]].mean()
    axes[0].barh(means.index, means["time"])
    axes[0].set(xlabel="train time per epoch (s)", title="Time")
    axes[1].barh(means.index, means["memory"] / 2**20)
    axes[1].set(xlabel="peak memory (MiB)", title="Memory")
    written.append(_save(fig, out_dir / "time_memory.png"))

    sweep = frame.dropna(subset=["rank"])
    if sweep["rank"].nunique() > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, g in sweep.groupby("base_method", sort=False):
            s = g.groupby("rank")["score"].mean()
            ax.plot(s.index, s.values, marker="o", label=method)
        ax.set(xlabel="rank r", ylabel="score", title="Rank sweep")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "rank_sweep.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_tables(results: Union[str, Path], out_dir: Union[str, Path], statistic: str = "mean") -> dict[str, Path]:
    """leaderboard.md / .csv / .html and the plots, from a results file. Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = results_frame(read_results(results))
    if frame.empty:
        raise ValueError(f"{results} has no successful cells to tabulate")
    paths = {"markdown": out_dir / "leaderboard.md", "html": out_dir / "leaderboard.html", "csv": out_dir / "leaderboard.csv"}
    paths["markdown"].write_text(render(frame, statistic, "markdown"))
    paths["html"].write_text(render(frame, statistic, "html"))
    agg = aggregate(frame, statistic)
    agg.assign(values=agg["values"].map(lambda v: "/".join(f"{x:.4f}" for x in v)), std=agg["std"].map(lambda v: "/".join(f"{x:.4f}" for x in v))).to_csv(paths["csv"], index=False)
    for i, p in enumerate(plots(frame, out_dir)):
        paths[f"plot{i}"] = p
    return paths
