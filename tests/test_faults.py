"""benchmark.faults (the fault-injection script): its adapter part, run small. The grid parts are what
tests/test_harness.py checks one case at a time; README gives a long run of the whole script."""

import json
import random
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc")


def test_killed_saves_leave_the_old_or_the_new_adapter(tmp_path):
    from benchmark.faults import adapter_rounds

    counts = adapter_rounds(30, random.Random(1), tmp_path)
    assert counts["ok"], counts
    assert counts["new"] + counts["old"] == 30 and counts["lost"] == counts["mixed_or_wrong"] == 0
    assert counts["killed_mid_save"] > 0  # the kills did land inside saves


def test_script_reports_and_exits_zero(tmp_path, capsys):
    from benchmark.faults import main

    assert main(["--adapter-rounds", "5", "--cell-rounds", "0", "--runner-rounds", "0", "--json", str(tmp_path / "r.json")]) == 0
    assert "OK: nothing lost, duplicated or wrong" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["adapter"]["rounds"] == 5
