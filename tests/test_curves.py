"""benchmark.curves: seed means, 'X% of full' crossings, equal-time comparisons, files written."""

import json
import math

import pytest


def record(method, label, seed, points, status="ok"):
    return {
        "cell_id": f"m|t|{label}|seed={seed}", "model": "m", "task": "t", "method": method, "method_label": label,
        "seed": seed, "status": status, "primary_metrics": ["val/accuracy"], "metrics": {"val/accuracy": points[-1][2]},
        "curve": [{"step": s, "train_s": t, "metrics": {"val/accuracy": a}} for s, t, a in points],
    }


RECORDS = [
    # full fine-tuning: slow per step, final 0.90 (mean of 0.89 and 0.91)
    record("full", "Full FT", 1, [(10, 20.0, 0.70), (20, 40.0, 0.85), (30, 60.0, 0.89)]),
    record("full", "Full FT", 2, [(10, 20.0, 0.72), (20, 40.0, 0.87), (30, 60.0, 0.91)]),
    # RoCoFT: twice as fast per step, reaches 0.86 (95.6% of 0.90) at step 20 and ends at 0.88
    record("rocoft-row", "RoCoFT", 1, [(10, 10.0, 0.60), (20, 20.0, 0.86), (30, 30.0, 0.88)]),
    record("rocoft-row", "RoCoFT", 2, [(10, 10.0, 0.62), (20, 20.0, 0.86), (30, 30.0, 0.88)]),
    record("rocoft-row", "Broken", 1, [(10, 10.0, 0.99)], status="failed"),
]


def test_seed_means_and_summary():
    from benchmark.curves import curve_frame, mean_curves, summarize

    curves = mean_curves(curve_frame(RECORDS))
    assert set(curves["method"]) == {"Full FT", "RoCoFT"}  # failed cells are left out
    full = curves[curves.method == "Full FT"]
    assert full["score"].tolist() == pytest.approx([71.0, 86.0, 90.0])
    assert full["score_min"].tolist() == pytest.approx([70.0, 85.0, 89.0]) and (full["seeds"] == 2).all()
    s = summarize(curves, fractions=(0.95, 0.99)).set_index("method")
    assert s.at["RoCoFT", "final_score"] == pytest.approx(88.0)
    assert s.at["RoCoFT", "steps_to_95%_of_full"] == 20 and s.at["RoCoFT", "seconds_to_95%_of_full"] == 20.0
    assert s.at["RoCoFT", "steps_to_99%_of_full"] is None or math.isnan(s.at["RoCoFT", "steps_to_99%_of_full"])
    assert s.at["Full FT", "steps_to_99%_of_full"] == 30
    # RoCoFT's run ended at 30 s, before full fine-tuning's 60 s: its score within 60 s is its final one
    assert s.at["RoCoFT", "score_at_full_seconds"] == pytest.approx(88.0) and s.at["RoCoFT", "ended_before_full_seconds"]
    # full fine-tuning at RoCoFT's 30 s: halfway between 71 (20 s) and 86 (40 s)
    assert s.at["RoCoFT", "full_score_at_own_seconds"] == pytest.approx(78.5)


def test_write_curves(tmp_path):
    from benchmark.curves import write_curves

    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    paths = write_curves(results)
    assert paths["curves_csv"].read_text().startswith("model,task,method,base_method,step,train_s,score")
    assert "| RoCoFT |" in paths["summary_md"].read_text()
    pngs = [p for k, p in paths.items() if k.startswith("plot_")]
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
    # no curves: nothing written
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({**RECORDS[0], "curve": None}) + "\n")
    assert write_curves(bare, tmp_path / "bare") == {} and not (tmp_path / "bare").exists()
