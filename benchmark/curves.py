"""Learning curves from a results file: score against steps and against training seconds, per method.

A cell that validates during training (``trainer.val_check_interval``) stores its evaluation points in its
record as ``curve``: ``[{"step", "train_s", "metrics"}, ...]`` (``train_s``: training seconds so far,
validation excluded). For every (model, task, method) this module averages the seeds point by point and
writes:

- ``curves.csv``: step, mean training seconds, mean / std / min / max of the primary metric over seeds;
- ``curves_summary.csv`` / ``.md``: final score, steps and seconds to reach X% of full fine-tuning's final
  score (first evaluation point whose seed-mean reaches it), the score at full fine-tuning's training
  time (the last point within it), and full fine-tuning's score at the method's own training time
  (interpolated on full fine-tuning's curve): the equal-time comparison;
- ``curves_<model>_<task>.png``: score vs steps and vs seconds, mean with a min-max band over seeds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from rocoft_pl.extras import require_extra

from .leaderboard import _as_percent
from .results import read_results

pd = require_extra("pandas", "bench")

REFERENCE_METHOD = "full"  # the method kind whose final score the "X% of" columns refer to


def curve_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluation point of every successful cell that has a curve (score as the leaderboard
    shows it: x100 for [0, 1] metrics)."""
    rows = []
    for r in records:
        if r.get("status") != "ok" or not r.get("curve"):
            continue
        primaries = r.get("primary_metrics") or sorted(r.get("metrics", {}))[:1]
        for point in r["curve"]:
            metric = next((m for m in primaries if m in point.get("metrics", {})), None)
            if metric is None:
                continue
            rows.append(
                {
                    "model": r["model"], "task": r["task"], "method": r.get("method_label") or r["method"],
                    "base_method": r["method"], "seed": r.get("seed"), "step": int(point["step"]),
                    "train_s": float(point["train_s"]), "score": _as_percent(metric, point["metrics"][metric]),
                }
            )
    return pd.DataFrame(rows)


def mean_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """(model, task, method, step) -> mean seconds and mean / std / min / max score over seeds."""
    if frame.empty:
        return frame
    g = frame.groupby(["model", "task", "method", "base_method", "step"], sort=False)
    out = g.agg(
        train_s=("train_s", "mean"), score=("score", "mean"), score_std=("score", "std"),
        score_min=("score", "min"), score_max=("score", "max"), seeds=("seed", "nunique"),
    ).reset_index()
    out["score_std"] = out["score_std"].fillna(0.0)
    return out.sort_values(["model", "task", "method", "step"], kind="stable").reset_index(drop=True)


def _interpolate(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    """y at x on the piecewise-linear curve (xs ascending); NaN outside it."""
    if len(xs) == 0 or x < xs[0] or x > xs[-1]:
        return math.nan
    return float(np.interp(x, xs, ys))


def summarize(curves: pd.DataFrame, fractions: Sequence[float] = (0.95, 0.99)) -> pd.DataFrame:
    """Per (model, task, method): final score, steps / seconds to reach each fraction of full fine-tuning's
    final score, score at full fine-tuning's training time, and full fine-tuning's score at the method's."""
    rows = []
    for (model, task), g in curves.groupby(["model", "task"], sort=False):
        ref = g[g.base_method == REFERENCE_METHOD]
        ref_final = ref.groupby("method").tail(1)
        ref_score = float(ref_final["score"].iloc[0]) if len(ref_final) else math.nan
        ref_time = float(ref_final["train_s"].iloc[0]) if len(ref_final) else math.nan
        ref_xs, ref_ys = (ref["train_s"].to_numpy(), ref["score"].to_numpy()) if len(ref) else (np.array([]), np.array([]))
        for method, m in g.groupby("method", sort=False):
            last = m.iloc[-1]
            row: dict[str, Any] = {
                "model": model, "task": task, "method": method, "seeds": int(last["seeds"]),
                "final_step": int(last["step"]), "final_train_s": float(last["train_s"]), "final_score": float(last["score"]),
            }
            for f in fractions:
                reached = m[m["score"] >= f * ref_score] if not math.isnan(ref_score) else m.iloc[0:0]
                hit = reached.iloc[0] if len(reached) else None
                row[f"steps_to_{f:.0%}_of_full"] = int(hit["step"]) if hit is not None else None
                row[f"seconds_to_{f:.0%}_of_full"] = float(hit["train_s"]) if hit is not None else None
            within = m[m["train_s"] <= ref_time] if not math.isnan(ref_time) else m.iloc[0:0]
            row["score_at_full_seconds"] = float(within["score"].iloc[-1]) if len(within) else None
            row["ended_before_full_seconds"] = bool(last["train_s"] < ref_time) if not math.isnan(ref_time) else None
            row["full_score_at_own_seconds"] = _interpolate(ref_xs, ref_ys, float(last["train_s"]))
            rows.append(row)
    return pd.DataFrame(rows)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot_curves(curves: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per (model, task): score vs steps and vs training seconds, seed mean and min-max band."""
    matplotlib = require_extra("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (model, task), g in curves.groupby(["model", "task"], sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for method, m in g.groupby("method", sort=False):
            for ax, x in zip(axes, ("step", "train_s")):
                (line,) = ax.plot(m[x], m["score"], marker=".", label=method)
                if m["seeds"].max() > 1:
                    ax.fill_between(m[x], m["score_min"], m["score_max"], color=line.get_color(), alpha=0.15)
        axes[0].set_xlabel("training steps")
        axes[1].set_xlabel("training seconds (validation excluded)")
        axes[0].set_ylabel("score (seed mean; band: min-max)")
        axes[1].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"{model} / {task}")
        fig.tight_layout()
        path = out_dir / f"curves_{_slug(model)}_{_slug(task)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _markdown(summary: pd.DataFrame) -> str:
    def fmt(v: Any, digits: int = 2) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    cols = [c for c in summary.columns if c not in ("model", "task")]
    lines = []
    for (model, task), g in summary.groupby(["model", "task"], sort=False):
        lines += [f"### {model} / {task}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, row in g.iterrows():
            lines.append("| " + " | ".join(fmt(row[c], 1 if "seconds" in c or c.endswith("_s") else 2) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def write_curves(
    results: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, fractions: Sequence[float] = (0.95, 0.99)
) -> dict[str, Path]:
    """Write curves.csv, curves_summary.csv/.md and the PNGs; {} when no record has a curve."""
    results = Path(results)
    out = Path(out_dir) if out_dir is not None else results.parent
    curves = mean_curves(curve_frame(read_results(results)))
    if curves.empty:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(curves, fractions)
    paths = {"curves_csv": out / "curves.csv", "summary_csv": out / "curves_summary.csv", "summary_md": out / "curves_summary.md"}
    curves.to_csv(paths["curves_csv"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text(_markdown(summary))
    for i, p in enumerate(plot_curves(curves, out)):
        paths[f"plot_{i}"] = p
    return paths


__all__ = ["curve_frame", "mean_curves", "plot_curves", "summarize", "write_curves"]
