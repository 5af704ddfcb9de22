"""`rocoft-bench adapters` on tiny random configs: the files it writes, their columns, and finite positive numbers.
No timing is asserted (the machine's load decides those)."""

import json
import math

import pandas as pd
import pytest

from benchmark.adapters_bench import MIXED_COLUMNS, SWAP_COLUMNS, SWAP_METHODS
from benchmark.cli import main


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    argv = ["adapters", "--models", "bert-tiny-config,llama-tiny-config", "--adapters", "1,2,4", "--batch-size", "4",
            "--seq-len", "8", "--swap-repeats", "1", "--reload-repeats", "1", "--mixed-repeats", "1", "--threads", "1",
            "--output-dir", str(out)]
    assert main(argv) == 0
    return out


def test_the_swap_table_has_every_method_of_every_model_with_positive_times(written):
    swap = pd.read_csv(written / "adapters_swap.csv")
    assert list(swap.columns) == SWAP_COLUMNS
    for model in ("bert-tiny-config", "llama-tiny-config"):
        assert list(swap[swap.model == model].method) == list(SWAP_METHODS)
    numbers = swap[["median_ms", "min_ms", "vs_rocoft_merged"]].to_numpy().ravel()
    assert all(math.isfinite(v) and v > 0 for v in numbers)
    assert (swap.set_index("method").loc["rocoft-merged", "vs_rocoft_merged"] == 1.0).all()
    assert swap[swap.method == "reload"].swaps.eq(1).all() and swap[swap.method != "reload"].swaps.eq(2).all()


def test_the_mixed_table_has_base_and_both_methods_per_adapter_count(written):
    mixed = pd.read_csv(written / "adapters_mixed.csv")
    assert list(mixed.columns) == MIXED_COLUMNS
    for model in ("bert-tiny-config", "llama-tiny-config"):
        rows = mixed[mixed.model == model]
        assert sorted(zip(rows.method, rows.adapters)) == sorted(
            [("base", 0)] + [(m, n) for m in ("rocoft", "peft-lora") for n in (1, 2, 4)]
        )
    assert all(math.isfinite(v) and v > 0 for v in mixed[["median_ms", "examples_per_s"]].to_numpy().ravel())
    adapted = mixed[mixed.method != "base"]
    assert all(math.isfinite(v) and v > 0 for v in adapted.vs_peft)
    assert (mixed[mixed.method == "peft-lora"].vs_peft == 1.0).all()
    assert mixed[mixed.method == "base"].vs_peft.isna().all()


def test_the_json_holds_the_setup_both_tables_the_times_and_the_targets(written):
    data = json.loads((written / "adapters.json").read_text())
    assert data["setup"]["counts"] == [1, 2, 4] and data["setup"]["lora_rank"] == 8 and data["setup"]["threads"] == 1
    assert [m["model"] for m in data["models"]] == ["bert-tiny-config", "llama-tiny-config"]
    for model in data["models"]:
        assert model["rocoft_layers"] > 0 and model["base_params"] > 0
        assert set(model["swap_times_s"]) == set(SWAP_METHODS)
        assert all(t > 0 for times in model["swap_times_s"].values() for t in times)
        assert set(model["mixed_times_s"]) == {"base-0", *(f"{m}-{n}" for m in ("rocoft", "peft-lora") for n in (1, 2, 4))}
        targets = {t["target"]: t for t in model["targets"]}
        assert "reload / rocoft-merged swap time" in targets
        assert "rocoft / peft-lora mixed-batch examples/s, 4 adapters" in targets
        assert all(math.isfinite(t["value"]) and t["value"] > 0 and isinstance(t["ok"], bool) for t in targets.values())
    assert not [p.name for p in written.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown models"):
        main(["adapters", "--models", "no-such-model", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="at most the batch size"):
        main(["adapters", "--models", "bert-tiny-config", "--adapters", "1,8", "--batch-size", "4",
              "--output-dir", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
