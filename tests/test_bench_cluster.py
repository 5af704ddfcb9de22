"""Grids on a cluster (benchmark/cluster.py): launcher options, the sbatch script of a GPU grid field by
field, and a real grid of tiny cells through submitit's local executor (the same code path as SLURM): one
cell preempted mid-run, requeued and resumed from its checkpoint, one failing for good after max_retries,
collect and status."""

import io
import json
import os
import signal
import sys
import time

import pytest
import yaml

from benchmark.faults import TINY_BASE
from benchmark.grid import load_grid
from benchmark.launcher_options import LauncherOptions, from_mapping, with_arguments

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="submitit's local executor, /proc")


def write_grid(tmp_path, methods, launcher=None, base=None, name="tiny"):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or TINY_BASE))
    grid = {
        "name": name,
        "base_config": str(tmp_path / "base.yaml"),
        "results": str(tmp_path / "out" / "results.jsonl"),
        "seeds": [1],
        "models": {"tiny-bert": {}},
        "tasks": {"tweets": {"primary_metrics": ["val/accuracy"]}},
        "methods": methods,
        "timeout_s": 300,
    }
    if launcher is not None:
        grid["launcher"] = launcher
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _parse(argv):
    from benchmark.cli import build_parser

    return build_parser().parse_args(argv)


def test_launcher_options_come_from_the_yaml_and_the_command_line_wins(tmp_path):
    grid = load_grid(write_grid(tmp_path, {"bitfit": {"method": "bitfit"}},
                                launcher={"kind": "slurm", "partition": "a", "qos": "low", "extra_sbatch": ["--exclusive"]}))
    args = _parse(["run", "grid.yaml", "--partition", "b", "--time-min", "30", "--extra-sbatch=--constraint=a100", "--extra-sbatch", "gres=gpu:a100:1"])
    options = with_arguments(from_mapping(grid.launcher), args)
    assert (options.kind, options.partition, options.qos, options.time_min) == ("slurm", "b", "low", 30)
    assert options.extra_sbatch == ("--constraint=a100", "gres=gpu:a100:1")
    from benchmark.cluster_resources import extra_sbatch

    assert extra_sbatch(options.extra_sbatch) == {"constraint": "a100", "gres": "gpu:a100:1"}
    assert with_arguments(from_mapping(grid.launcher), _parse(["run", "g.yaml", "--launcher", "local"])).kind == "local"
    with pytest.raises(ValueError, match="unknown option.*partiton"):
        load_grid(write_grid(tmp_path, {"bitfit": {"method": "bitfit"}}, launcher={"partiton": "a"}))
    with pytest.raises(ValueError, match="max_retries"):
        LauncherOptions(max_retries=-1)


def _sbatch_fields(text):
    fields = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            fields[key] = value if value else True
    return fields


def test_sbatch_script_of_a_gpu_grid_field_by_field(tmp_path):
    from benchmark.cell_store import cluster_paths
    from benchmark.cluster_resources import cell_resources, resource_groups, sbatch_text, slurm_parameters

    gpu_base = {**TINY_BASE, "trainer": {**TINY_BASE["trainer"], "accelerator": "gpu"}}
    grid = load_grid(write_grid(tmp_path, {
        "fsdp": {"method": "rocoft-row", "params": {"rank": 1}, "overrides": {"trainer.devices": 4}},
        "two-nodes": {"method": "rocoft-row", "params": {"rank": 3},
                      "overrides": {"trainer.devices": 2, "trainer.num_nodes": 2}, "timeout_s": 7200},
        "one-gpu": {"method": "bitfit", "seeds": [1, 2]},
        "cpu": {"method": "bitfit", "overrides": {"trainer.accelerator": "cpu"}},
    }, base=gpu_base, launcher={"kind": "slurm", "partition": "gpu", "account": "proj", "qos": "high",
                                "cpus_per_task": 8, "mem": "64GB", "max_parallel": 2,
                                "extra_sbatch": ["--constraint=a100", "#SBATCH --exclusive"],
                                "setup": ["source .venv/bin/activate"]}))
    options = from_mapping(grid.launcher)
    res = {c.method_label: cell_resources(c, options) for c in grid.cells}
    assert (res["fsdp"].gpus, res["fsdp"].nodes, res["fsdp"].tasks_per_node, res["fsdp"].time_min) == (4, 1, 4, 5)
    assert (res["two-nodes"].gpus, res["two-nodes"].nodes, res["two-nodes"].tasks_per_node) == (2, 2, 2)
    assert res["two-nodes"].time_min == 120 and res["two-nodes"].gpu_hours == 8.0
    assert (res["one-gpu"].gpus, res["one-gpu"].tasks_per_node) == (1, 1)
    assert (res["cpu"].gpus, res["cpu"].tasks_per_node) == (0, 1)
    groups = resource_groups(grid.cells, options)
    assert sorted(len(cells) for cells in groups.values()) == [1, 1, 1, 2]  # one job array per set of needs

    folder = cluster_paths(grid.results).submitit / "%j"
    text = sbatch_text(folder, slurm_parameters(options, res["fsdp"], "rocoft-tiny"), array_size=3)
    fields = _sbatch_fields(text)
    assert fields["gpus-per-node"] == "4" and fields["ntasks-per-node"] == "4" and fields["nodes"] == "1"
    assert fields["time"] == "5" and fields["partition"] == "gpu" and fields["account"] == "proj"
    assert fields["qos"] == "high" and fields["cpus-per-task"] == "8" and fields["mem"] == "64GB"
    assert fields["array"] == "0-2%2" and fields["signal"] == "USR2@120" and fields["job-name"] == "rocoft-tiny"
    assert fields["constraint"] == "a100" and fields["exclusive"] is True
    assert fields["output"].endswith("/cluster/submitit/%A_%a/%A_%a_0_log.out") and "error" not in fields
    lines = text.splitlines()
    assert lines.index("source .venv/bin/activate") < next(i for i, l in enumerate(lines) if l.startswith("srun"))
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.startswith("srun --unbuffered") and srun.endswith(f"-m submitit.core._submit {folder}")
    assert "gpus-per-node" not in _sbatch_fields(sbatch_text(folder, slurm_parameters(options, res["cpu"], "x"), 1))
    nodes = _sbatch_fields(sbatch_text(folder, slurm_parameters(options, res["two-nodes"], "x"), 1))
    assert (nodes["nodes"], nodes["ntasks-per-node"], nodes["gpus-per-node"], nodes["time"]) == ("2", "2", "2", "120")


def test_dry_run_lists_cells_resources_and_totals(tmp_path, capsys):
    from benchmark.cli import main

    gpu_base = {**TINY_BASE, "trainer": {**TINY_BASE["trainer"], "accelerator": "gpu"}}
    grid = write_grid(tmp_path, {"fsdp": {"method": "bitfit", "overrides": {"trainer.devices": 4}},
                                 "one": {"method": "bitfit", "seeds": [1, 2]}}, base=gpu_base)
    assert main(["run", str(grid), "--launcher", "slurm", "--dry-run", "--time-min", "90"]) == 0
    out = capsys.readouterr().out
    assert "3 cell(s), 0 finished (skipped), 3 to run with the slurm launcher" in out
    assert "jobs: 3 in 2 job array(s)" in out
    assert "GPU hours booked by the time limits (an upper bound): 9.0" in out  # 4 x 1.5 + 2 x 1 x 1.5
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_submitit_local_grid_preempted_cell_resumes_failure_stops_collect_and_status(tmp_path, capsys):
    from benchmark.cell_store import cluster_paths, collect
    from benchmark.cluster import run_cluster
    from benchmark.cluster_status import cell_states, format_states
    from benchmark.results import read_results
    from benchmark.runner import prepare

    slow = {  # checkpoints every step and holds each step, so the preemption lands mid-run
        "trainer.max_steps": 6, "trainer.enable_checkpointing": True,
        "trainer.callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": 1}},
            {"class_path": "benchmark.slow_steps.SlowSteps", "init_args": {"seconds": 0.7}},
        ],
    }
    path = write_grid(tmp_path, {
        "row": {"method": "rocoft-row", "params": {"rank": 1}},
        "slow": {"method": "bitfit", "overrides": slow},
        "broken": {"method": "rocoft-column", "params": {"rank": 100000}},  # fails in setup, every time
    }, launcher={"kind": "submitit-local", "max_retries": 1})
    grid = prepare(path)
    options = from_mapping(grid.launcher)
    paths = cluster_paths(grid.results)
    by_label = {c.method_label: c for c in grid.cells}
    slow_work = paths.work(by_label["slow"].config_hash)
    log = io.StringIO()
    # The driver submits and exits (--no-wait); the cells run on.
    assert run_cluster(grid, options, wait=False, log=log) == []

    # Preempt the slow cell once it has a checkpoint: USR2 to its job, as SLURM sends before a preemption.
    def checkpointed_and_running():
        running = slow_work / "running.json"
        return running.exists() and any(slow_work.rglob("*.ckpt")) and json.loads(running.read_text())
    running = _wait_for(checkpointed_and_running, 240, "the slow cell's first checkpoint")
    assert not running["resume"] and running["attempt"] == 1
    states = {s.cell_id: s.state for s in cell_states(grid)}
    assert states[by_label["slow"].cell_id] == "running"
    os.kill(running["pid"], signal.SIGUSR2)

    # A driver comes back: it waits for the jobs in flight, retries the failure, collects.
    records = run_cluster(grid, options, poll_s=0.2, log=log)
    assert len(records) == 3, log.getvalue()

    records = {r["method_label"]: r for r in read_results(grid.results)}
    assert sorted(records) == ["broken", "row", "slow"], log.getvalue()
    assert records["row"]["status"] == "ok" and records["row"]["attempt"] == 1
    resumed = records["slow"]
    assert resumed["status"] == "ok", resumed.get("error")
    assert 1 <= resumed["resumed_from_step"] < 6  # the requeued job went on from the checkpoint...
    assert resumed["train_batches"] == 6 - resumed["resumed_from_step"]  # ...and trained only the rest
    slow_log = (slow_work / "log.txt").read_text()
    assert "attempt 1 (resumed)" in slow_log and slow_log.count("=== ") == 2
    broken = records["broken"]
    assert broken["status"] == "failed" and broken["attempt"] == 2 and "exceeds" in broken["error"]
    assert "submitting it again (attempt 2 of 2)" in log.getvalue() and "(attempt 3" not in log.getvalue()
    jobs = json.loads(paths.jobs.read_text())["cells"]
    assert {e["cell_id"] for e in jobs.values()} == {c.cell_id for c in grid.cells}
    assert all(e["job_id"].isdigit() and e["launcher"] == "submitit-local" for e in jobs.values())

    # status: from the files and the (ended) jobs, with the failed cell's log tail
    states = {s.cell_id: s for s in cell_states(grid)}
    assert {s.state for s in states.values()} == {"done", "failed"}
    failed = states[broken["cell_id"]]
    assert failed.state == "failed" and failed.attempt == 2 and "exceeds" in failed.log_tail
    assert failed.detail.startswith("exit code 1: ValueError: rank 100000 exceeds")
    text = format_states(grid, list(states.values()))
    assert "3 cell(s): 2 done, 0 running, 0 pending, 1 failed" in text and "log tail" in text

    # collect rebuilds the store from the cell files alone, and keeps records it does not own
    before = grid.results.read_text()
    grid.results.write_text(json.dumps({"cell_id": "lm-eval|other", "status": "ok", "metrics": {}}) + "\n")
    assert collect(grid)[1] == 3
    rebuilt = {r["cell_id"]: r for r in read_results(grid.results)}
    assert "lm-eval|other" in rebuilt
    assert {k: v for k, v in rebuilt.items() if k != "lm-eval|other"} == {
        r["cell_id"]: r for r in map(json.loads, before.splitlines())}

    # a dry run now plans the failed cell only
    from benchmark.cli import main

    capsys.readouterr()
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "3 cell(s), 2 finished (skipped), 1 to run with the submitit-local launcher" in capsys.readouterr().out


def test_status_reads_slurm_states_from_one_sacct_call(tmp_path, monkeypatch):
    """SLURM job states (a fake `sacct` on PATH, in sacct's --parsable2 format) and the cell files give
    each cell's state: running, queued, ended without a record (with its log tail), done, not submitted."""
    from benchmark.cell_store import cluster_paths, write_json_atomically
    from benchmark.cluster import save_jobs
    from benchmark.cluster_status import cell_states

    grid = load_grid(write_grid(tmp_path, {k: {"method": "rocoft-row", "params": {"rank": r}} for r, k in enumerate("abcde", 1)}))
    cells = {c.method_label: c for c in grid.cells}
    paths = cluster_paths(grid.results)
    calls = tmp_path / "sacct_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(
        "#!/bin/sh\necho \"$@\" >> " + str(calls) + "\n"
        "printf 'JobID|State|NodeList\\n7_0|RUNNING|n1\\n7_1|PENDING|None\\n7_2|OUT_OF_MEMORY|n2\\n7_3|COMPLETED|n3\\n'\n")
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs = {cells[k].config_hash: {"cell_id": cells[k].cell_id, "job_id": f"7_{i}", "attempt": 1, "launcher": "slurm"}
            for i, k in enumerate("abcd")}
    save_jobs(paths, jobs)
    (paths.work(cells["c"].config_hash)).mkdir(parents=True)
    (paths.work(cells["c"].config_hash) / "log.txt").write_text("loading\nCUDA out of memory\n")
    write_json_atomically(paths.result(cells["d"].config_hash),
                          {"cell_id": cells["d"].cell_id, "status": "ok", "attempt": 1, "metrics": {"val/accuracy": 0.75}})

    states = {s.cell_id: s for s in cell_states(grid)}
    got = {k: states[cells[k].cell_id].state for k in "abcde"}
    assert got == {"a": "running", "b": "pending", "c": "failed", "d": "done", "e": "pending"}
    assert "OUT_OF_MEMORY" in states[cells["c"].cell_id].detail
    assert "CUDA out of memory" in states[cells["c"].cell_id].log_tail
    assert states[cells["e"].cell_id].detail == "not submitted"
    assert "val/accuracy 0.75" in states[cells["d"].cell_id].detail
    assert len(calls.read_text().splitlines()) == 1  # one sacct call for the whole grid


def _fake_slurm(tmp_path, monkeypatch, sacct_lines):
    """`srun`, `sbatch` (keeps each script, answers job ids 100, 101, ...) and `sacct` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = tmp_path / "sbatch_scripts"
    scripts.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\nn=$(ls {scripts} | wc -l)\ncp \"$1\" {scripts}/$((100 + n)).sh\n"
        "echo \"Submitted batch job $((100 + n))\"\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n" + "".join(l + "\\n" for l in sacct_lines) + "'\n")
    for name in ("srun", "sbatch", "sacct"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_driver_submits_one_array_per_set_of_needs_and_never_twice(tmp_path, monkeypatch):
    from benchmark.cell_store import cluster_paths
    from benchmark.cluster import load_jobs, run_cluster

    gpu_base = {**TINY_BASE, "trainer": {**TINY_BASE["trainer"], "accelerator": "gpu"}}
    grid = load_grid(write_grid(tmp_path, {
        "one": {"method": "bitfit", "seeds": [1, 2]},
        "fsdp": {"method": "rocoft-row", "params": {"rank": 1}, "overrides": {"trainer.devices": 2}},
    }, base=gpu_base, launcher={"kind": "slurm", "partition": "gpu", "max_parallel": 8}))
    scripts = _fake_slurm(tmp_path, monkeypatch, [])
    log = io.StringIO()
    assert run_cluster(grid, from_mapping(grid.launcher), wait=False, log=log) == []
    submitted = {p.stem: _sbatch_fields(p.read_text()) for p in scripts.iterdir()}
    assert len(submitted) == 2, log.getvalue()  # the two 1-GPU cells in one array, the 2-GPU cell alone
    array = next(f for f in submitted.values() if "array" in f)
    single = next(f for f in submitted.values() if "array" not in f)
    assert (array["array"], array["gpus-per-node"], array["ntasks-per-node"], array["partition"]) == ("0-1%2", "1", "1", "gpu")  # %N is at most the array size
    assert (single["gpus-per-node"], single["ntasks-per-node"]) == ("2", "2")
    jobs = load_jobs(cluster_paths(grid.results))
    ids = sorted(e["job_id"] for e in jobs.values())
    assert len(ids) == 3 and sum("_" in i for i in ids) == 2 and all(e["launcher"] == "slurm" for e in jobs.values())
    for cell in grid.cells:  # each cell's spec is in its directory for the job to read
        assert json.loads((cluster_paths(grid.results).work(cell.config_hash) / "cell.json").read_text())["cell_id"] == cell.cell_id

    # A driver that comes back while SLURM still runs or queues them submits nothing again.
    _fake_slurm(tmp_path, monkeypatch, [f"{i}|{'RUNNING' if n else 'PENDING'}|n1" for n, i in enumerate(ids)])
    assert run_cluster(grid, from_mapping(grid.launcher), wait=False, log=log) == []
    assert len(list(scripts.iterdir())) == 2 and "3 cell(s) still in flight" in log.getvalue()
