"""Leaderboard tables from a fixed results file, and the results store's atomic writes."""

import json
import signal
import subprocess
import sys
import time

from benchmark.leaderboard import render, results_frame, write_tables
from benchmark.results import finished_cells, read_results, upsert_result

FIXTURE = "tests/fixtures/bench/results.jsonl"

EXPECTED = """### tiny (mean over seeds)

| Method | #TTPs | sst2 | mrpc | Avg. |
|---|---|---|---|---|
| full | 6,000 | <u>91.00 ± 1.41</u> | <u>70.00/80.00</u> | <u>80.50</u> |
| RoCoFT 3-Row | 400 | **93.00 ± 2.83** | **75.00/85.00** | **84.00** |
| LoRA r=8 | 3,000 | 81.00 ± 1.41 | 60.00/70.00 | 70.50 |
"""


def test_markdown_leaderboard_matches_expected_values_and_marks():
    frame = results_frame(read_results(FIXTURE))
    assert len(frame) == 9  # the failed bitfit cell is left out
    assert render(frame, "mean", "markdown") == EXPECTED


def test_html_csv_and_plots_are_written(tmp_path):
    paths = write_tables(FIXTURE, tmp_path)
    html = paths["html"].read_text()
    assert "<b>93.00 ± 2.83</b>" in html and "<u>91.00 ± 1.41</u>" in html
    csv = paths["csv"].read_text().splitlines()
    assert csv[0].startswith("model,task,method,value")
    assert any(line.startswith("tiny,sst2,RoCoFT 3-Row,93.0") for line in csv)
    pngs = [p for k, p in paths.items() if k.startswith("plot")]
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)


def test_median_differs_from_mean_with_three_seeds(tmp_path):
    records = [
        {"cell_id": f"m|t|x|seed={s}", "model": "m", "task": "t", "method": "x", "seed": s, "status": "ok",
         "metrics": {"val/accuracy": v}, "primary_metrics": ["val/accuracy"], "adapter_params": 1}
        for s, v in enumerate([0.1, 0.2, 0.9])
    ]
    frame = results_frame(records)
    assert "| x | 1 | **40.00 ± 43.59** | **40.00** |" in render(frame, "mean")
    assert "| x | 1 | **20.00 ± 43.59** | **20.00** |" in render(frame, "median")


def test_upsert_replaces_a_cell_and_finished_cells_tracks_status(tmp_path):
    path = tmp_path / "r.jsonl"
    upsert_result(path, {"cell_id": "a", "status": "failed", "config_hash": "h"})
    upsert_result(path, {"cell_id": "b", "status": "ok", "config_hash": "h"})
    upsert_result(path, {"cell_id": "a", "status": "ok", "config_hash": "h2"})
    assert [r["cell_id"] for r in read_results(path)] == ["b", "a"]
    assert finished_cells(path) == {"b": "h", "a": "h2"}


def test_damaged_lines_are_skipped_and_reported_with_their_number(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text('{"cell_id": "a"}\n{broken\n[1, 2]\n{"no_cell_id": 1}\n{"cell_id": "b"}\n')
    before = path.read_bytes()
    assert [r["cell_id"] for r in read_results(path)] == ["a", "b"]
    assert "r.jsonl: damaged line(s) 2, 3, 4 skipped" in capsys.readouterr().err
    assert path.read_bytes() == before  # a reader never repairs

    # A writer sets them aside, with their numbers, and keeps every good record.
    upsert_result(path, {"cell_id": "c", "status": "ok"})
    assert [r["cell_id"] for r in read_results(path)] == ["a", "b", "c"]
    aside = [json.loads(line) for line in (tmp_path / "r.jsonl.damaged").read_text().splitlines()]
    assert [(a["line"], a["text"]) for a in aside] == [(2, "{broken"), (3, "[1, 2]"), (4, '{"no_cell_id": 1}')]
    assert "set aside" in capsys.readouterr().err


WRITER = """
import sys
from benchmark.results import upsert_result
i = 0
while True:
    upsert_result(sys.argv[1], {"cell_id": f"c{i % 50}", "status": "ok", "blob": "x" * 200_000, "i": i})
    i += 1
"""


def test_killing_a_writer_mid_write_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "r.jsonl"
    for delay in (0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        records = read_results(path)  # parses completely: no partial line
        assert records and all(len(r["blob"]) == 200_000 for r in records)
        assert len({r["cell_id"] for r in records}) == len(records)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.jsonl.")]
    # A killed writer can leave its temporary file behind, never a damaged results file.
    assert all(p.startswith(".r.jsonl.") for p in leftovers)
    json.dumps(records)
