"""rocoft-bench peak-rss: one process per W0 storage, the peak counter reset after setup (Linux only)."""

import json
import sys
from pathlib import Path

import pytest

from benchmark.cli import main

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def test_peak_rss_per_storage_on_a_tiny_llama(tmp_path, capsys):
    rc = main(["peak-rss", "--model", "llama-tiny-config", "--storages", "fp32,nf4", "--steps", "1",
               "--batch-size", "2", "--seq-len", "8", "--threads", "1", "--output-dir", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "peak_rss.json").read_text())
    assert [r["storage"] for r in rows] == ["fp32", "nf4"]
    for r in rows:
        assert 0 < r["rss_setup_mib"] <= r["peak_rss_train_mib"] < 64 * 1024
        assert r["trainable"] > 0 and r["threads"] == 1
    # NF4 stores the block Linears' weights in half a byte: fewer stored bytes than fp32
    assert rows[1]["stored_mib"] < rows[0]["stored_mib"]
    assert (tmp_path / "peak_rss.csv").read_text().splitlines()[0].startswith("storage,")
    assert "| nf4 |" in capsys.readouterr().out


def test_unknown_storage_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown storage"):
        main(["peak-rss", "--storages", "fp16", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
