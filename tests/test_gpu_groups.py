"""`rocoft-bench run` hands each cell a group of GPUs of its trainer's size (faked GPUs, no cell process)."""

import threading
import time
from pathlib import Path

import pytest
from test_bench_grid import write_grid

from benchmark import gpu_groups, runner
from benchmark.gpu_groups import GpuPool, cell_needs, gpu_need, visible_gpus
from benchmark.grid import GridError, load_grid

GPU = {"trainer.accelerator": "gpu"}


@pytest.fixture(autouse=True)
def _configs_not_parsed(monkeypatch):
    """Only the GPUs matter here; the config checks before a run are tests/test_harness.py's."""
    monkeypatch.setattr(runner, "validate_grid", lambda grid, parser=None: None)


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_groups, "_device_count", lambda: 4)


class Recorder:
    """run_one without a subprocess: records each cell's CUDA_VISIBLE_DEVICES; ``together`` cells must be
    running at the same time (a barrier), ``failing`` cells are recorded as failed."""

    def __init__(self, together=1, failing=()):
        self.devices, self.lock = {}, threading.Lock()
        self.barrier = threading.Barrier(together) if together > 1 else None
        self.failing = set(failing)

    def __call__(self, grid, cell, device=None, claim=None, live=None):
        with self.lock:
            self.devices[cell.cell_id] = device
        if self.barrier is not None:
            self.barrier.wait(timeout=30)  # BrokenBarrierError when the cells could not run together
        status = "failed" if cell.method_label in self.failing else "ok"
        record = {k: v for k, v in cell.to_dict().items() if k != "config"}
        return {**record, "status": status, "error": "boom" if status == "failed" else None,
                "metrics": {"val/accuracy": 0.5}, "grid": grid.name, "wall_s": 0.0, "log": "log.txt"}


def _run(monkeypatch, grid, recorder, jobs=1, pools=None):
    """run_grid in a thread, so a group never given back fails the test instead of hanging it (the pools
    made go into ``pools``)."""
    pools = [] if pools is None else pools

    class Pool(GpuPool):
        def __init__(self, ids):
            super().__init__(ids)
            pools.append(self)

    monkeypatch.setattr(runner, "GpuPool", Pool)
    monkeypatch.setattr(runner, "run_one", recorder)
    out, errors = [], []

    def target():
        try:
            out.append(runner.run_grid(grid, jobs=jobs))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        for pool in pools:  # unblock the runner's workers, or pytest would wait for them at exit
            pool.release(pool.ids)
        thread.join(30)
        pytest.fail("the runner got stuck waiting for GPUs")
    if errors:
        raise errors[0]
    return out[0]


def _config(**trainer):
    return {"trainer": trainer}


# -- what a cell needs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer, visible, need", [
    ({"accelerator": "cpu", "devices": 4}, 4, 0),
    ({"accelerator": "gpu", "devices": 4}, 4, 4),
    ({"accelerator": "cuda", "devices": "2"}, 4, 2),
    ({"accelerator": "gpu", "devices": [0, 1]}, 4, 2),
    ({"accelerator": "gpu", "devices": "1,0"}, 4, 2),
    ({"accelerator": "gpu", "devices": -1}, 3, 3),
    ({"accelerator": "gpu", "devices": "auto"}, 3, 3),
    ({"accelerator": "gpu"}, 4, 1),  # devices unset: one GPU per cell, as the presets mean
    ({"devices": 2}, 4, 2),  # accelerator unset is Lightning's "auto"
    ({"devices": 2}, 0, 0),  # ... which runs on the CPU without GPUs
    ({}, 0, 0),
    ({"accelerator": {"class_path": "lightning.pytorch.accelerators.CUDAAccelerator"}, "devices": 2}, 4, 2),
    ({"accelerator": "gpu", "devices": 1}, 0, 1),  # refused up front: more than visible
    ({"accelerator": "gpu", "devices": -1}, 0, 1),
])
def test_need_follows_the_trainers_accelerator_and_devices(trainer, visible, need):
    assert gpu_need(_config(**trainer), visible) == need


@pytest.mark.parametrize("trainer, message", [
    ({"accelerator": "gpu", "devices": [1, 3]}, "give a count instead"),
    ({"accelerator": "gpu", "devices": 0}, "must be a count >= 1"),
    ({"accelerator": "gpu", "devices": 1, "num_nodes": 2}, "num_nodes is 2.*cluster launcher"),
    ({"accelerator": "cpu", "num_nodes": 2}, "num_nodes is 2"),
])
def test_needs_the_runner_cannot_honour_are_errors(trainer, message):
    with pytest.raises(ValueError, match=message):
        gpu_need(_config(**trainer), 4)


def test_the_runners_cuda_visible_devices_is_the_pool(monkeypatch):
    monkeypatch.setattr(gpu_groups, "_device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(gpu_groups, "_device_count", lambda: 0)
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(gpu_groups, "_device_count", lambda: 3)
    assert visible_gpus() == ["0", "1", "2"]


def test_table2_cells_take_one_gpu_each_and_the_papers_global_batch():
    """The 13B cells run on one GPU: the paper's global batches (9 commonsense, 16 math) do not both split
    over 4 (GlobalBatchSize would refuse)."""
    from rocoft_pl.batching import split_global_batch

    cells = load_grid(Path(__file__).parents[1] / "configs" / "bench" / "table2.yaml").cells
    assert set(cell_needs(cells, ["0"]).values()) == {1}
    for cell in cells:
        size = cell.config["global_batch"]["size"]
        assert size == {"commonsense": 9, "math": 16}[cell.task]
        assert "accumulate_grad_batches" not in cell.config["trainer"]
        assert split_global_batch(size, 1, cell.config["data"]["init_args"]["batch_size"]) in ((3, 3), (8, 2))


# -- the pool ------------------------------------------------------------------------------------------------


def _acquire_in_thread(pool, n, order):
    def target():
        order.append((n, pool.acquire(n)))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_pool_hands_out_disjoint_groups_first_come_first_served():
    pool = GpuPool(["0", "1", "2", "3"])
    first = pool.acquire(3)
    assert first == ["0", "1", "2"] and pool.free() == ["3"]
    order = []
    big = _acquire_in_thread(pool, 2, order)
    _until(lambda: pool.waiting() == 1)
    small = _acquire_in_thread(pool, 1, order)  # one GPU is free, but the 2-GPU cell asked first
    _until(lambda: pool.waiting() == 2)
    time.sleep(0.1)
    assert order == []
    pool.release(first)
    big.join(10)
    small.join(10)
    assert [n for n, _ in order] == [2, 1]
    groups = [set(g) for _, g in order]
    assert groups[0].isdisjoint(groups[1]) and len(groups[0] | groups[1]) == 3
    assert pool.acquire(0) == [] and pool.waiting() == 0
    with pytest.raises(ValueError, match="5 GPU"):
        pool.acquire(5)


# -- the runner ----------------------------------------------------------------------------------------------


def test_a_four_gpu_cell_gets_four_distinct_ids(tmp_path, monkeypatch, four_gpus):
    grid = write_grid(tmp_path, {"big": {"method": "bitfit", "seeds": [1], "overrides": {**GPU, "trainer.devices": 4}}})
    recorder = Recorder()
    _run(monkeypatch, grid, recorder)
    (device,) = recorder.devices.values()
    assert sorted(device.split(",")) == ["0", "1", "2", "3"]


def test_two_two_gpu_cells_run_together_on_disjoint_groups(tmp_path, monkeypatch, four_gpus):
    grid = write_grid(tmp_path, {"pair": {"method": "bitfit", "overrides": {**GPU, "trainer.devices": 2}}})  # seeds 1, 2
    recorder = Recorder(together=2)
    written = _run(monkeypatch, grid, recorder, jobs=2)
    assert len(written) == 2
    groups = [set(d.split(",")) for d in recorder.devices.values()]
    assert all(len(g) == 2 for g in groups) and groups[0].isdisjoint(groups[1])


def test_cells_the_machine_cannot_run_are_refused_before_any_starts(tmp_path, monkeypatch, four_gpus):
    def no_cell(*args, **kwargs):
        raise AssertionError("a cell was started")

    monkeypatch.setattr(runner, "run_one", no_cell)
    grid = write_grid(tmp_path, {
        "fits": {"method": "bitfit", "overrides": {**GPU, "trainer.devices": 1}},
        "huge": {"method": "bitfit", "seeds": [1], "overrides": {**GPU, "trainer.devices": 8}},
        "nodes": {"method": "bitfit", "seeds": [1], "overrides": {**GPU, "trainer.devices": 1, "trainer.num_nodes": 2}},
    })
    with pytest.raises(GridError) as err:
        runner.run_grid(grid, jobs=2)
    message = str(err.value)
    assert "2 problem(s)" in message and "no cell was started" in message
    assert "tiny-bert|tweets|huge|seed=1: needs 8 GPU(s) (trainer.devices 8), 4 visible (0,1,2,3)" in message
    assert "tiny-bert|tweets|nodes|seed=1: trainer.num_nodes is 2" in message and "cluster launcher" in message
    assert "fits" not in message
    assert not (tmp_path / "out" / "cells").exists()


def test_cpu_cells_are_unaffected(tmp_path, monkeypatch):
    grid = write_grid(tmp_path, {"cpu": {"method": "bitfit"}})  # accelerator cpu, two seeds
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_groups, "_device_count", lambda: 0)
    recorder = Recorder(together=2)  # no GPU to wait for: both run at once
    _run(monkeypatch, grid, recorder, jobs=2)
    assert list(recorder.devices.values()) == [None, None]  # the runner's environment, as before

    # On a GPU machine a CPU cell takes no GPU, never waits, and sees none.
    monkeypatch.setattr(gpu_groups, "_device_count", lambda: 4)
    grid = write_grid(tmp_path, {"cpu": {"method": "bitfit", "seeds": [3]},
                                 "big": {"method": "full", "seeds": [3], "overrides": {**GPU, "trainer.devices": 4}}})
    recorder = Recorder(together=2)
    _run(monkeypatch, grid, recorder, jobs=2)
    assert sorted(recorder.devices.values()) == ["", "0,1,2,3"]


def test_groups_are_given_back_after_a_failing_cell(tmp_path, monkeypatch, four_gpus):
    # jobs=1 and two 4-GPU cells: the second can start only if the first cell's group came back.
    grid = write_grid(tmp_path, {"big": {"method": "bitfit", "label": "big", "overrides": {**GPU, "trainer.devices": 4}}})
    recorder = Recorder(failing={"big"})
    written = _run(monkeypatch, grid, recorder)
    assert [r["status"] for r in written] == ["failed", "failed"]
    assert list(recorder.devices.values()) == ["0,1,2,3", "0,1,2,3"]

    # A crash in the runner's own code on the way gives the group back too.
    def crash(*args, **kwargs):
        raise RuntimeError("crashed")

    pools = []
    with pytest.raises(RuntimeError, match="crashed"):
        _run(monkeypatch, grid, crash, pools=pools)
    assert pools[0].free() == ["0", "1", "2", "3"]


def test_the_runners_cuda_visible_devices_restricts_the_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(gpu_groups, "_device_count", lambda: 2)
    grid = write_grid(tmp_path, {"one": {"method": "bitfit", "overrides": {**GPU, "trainer.devices": 1}}})
    recorder = Recorder(together=2)
    _run(monkeypatch, grid, recorder, jobs=2)
    assert sorted(recorder.devices.values()) == ["2", "3"]
    grid = write_grid(tmp_path, {"all": {"method": "full", "seeds": [1], "overrides": {**GPU, "trainer.devices": -1}}})
    recorder = Recorder()
    _run(monkeypatch, grid, recorder)
    assert list(recorder.devices.values()) == ["2,3"]


def test_a_cell_sees_its_group_and_no_launch_variables_of_the_runner(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    env = runner.cell_env("2,3")
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["SLURM_JOB_ID"] == "42"
    assert not {"RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"} & set(env)
    assert runner.cell_env(None)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_a_multi_gpu_cell_writes_one_result_and_one_adapter(tmp_path, monkeypatch):
    """Lightning runs `python -m benchmark.cell` once per GPU of a cell: only global rank 0 writes."""
    import json

    import torch

    from benchmark import cell as cell_module
    from rocoft_pl import RoCoFT, RoCoFTConfig, apply_rocoft

    spec = tmp_path / "cell.json"
    spec.write_text(json.dumps({}))
    for rank in (1, 0):
        monkeypatch.setattr(cell_module, "run_cell", lambda cell, out, resume=False, rank=rank: {"global_rank": rank, "status": "ok"})
        cell_module.main([str(spec), str(tmp_path / "result.json")])
        assert (tmp_path / "result.json").exists() == (rank == 0)
    assert "global_rank" not in json.loads((tmp_path / "result.json").read_text())

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.layer = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    apply_rocoft(model, RoCoFTConfig(rank=1, targets=["layer.0"]))
    assert cell_module._adapter_bytes(RoCoFT(), model, tmp_path / "r1", writer=False) == 0
    assert not (tmp_path / "r1" / "adapter").exists()
    assert cell_module._adapter_bytes(RoCoFT(), model, tmp_path / "r0", writer=True) > 0
    assert (tmp_path / "r0" / "adapter" / "adapter_model.safetensors").is_file()
