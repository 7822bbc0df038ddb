"""The executor's two verbs on both backends, pool reuse, and cleanup after a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from pipeline.executor import Executor, JobContext, Resources, _alive, _session_pids
from pipeline.params import ExecutorParams


class _Square:
    def __call__(self):
        pid = os.getpid()
        return lambda x: (x * x, pid)


class _Hinted:
    def __init__(self, it, hint):
        self.it, self.hint = it, hint

    def __iter__(self):
        return self.it

    def __length_hint__(self):
        return self.hint


def _job(ctx: JobContext, config: dict) -> dict:
    import torch

    model = ctx.prepare_model(torch.nn.Linear(2, 1))
    loss = model(torch.ones(4, 2)).sum()
    loss.backward()
    ctx.report({"loss": float(loss.detach())})
    ctx.barrier()
    return {"rank": ctx.rank, "world": ctx.world_size, "x": config["x"], "reports": ctx.reported}


def test_local_map_keeps_order_and_runs_in_process():
    ex = Executor(ExecutorParams(backend="local", progress=False))
    out = list(ex.map(_Square(), range(7)))
    assert [v for v, _ in out] == [i * i for i in range(7)]
    assert {pid for _, pid in out} == {os.getpid()}
    assert ex.stats["items"] == 7 and ex.stats["workers_started"] == 0
    # any iterable, read lazily: the worker is built once, and not at all for no items
    built = []

    def factory():
        built.append(1)
        return lambda x: x + 1

    gen = ex.map(factory, (i for i in range(3)))
    assert next(gen) == 1 and built == [1] and list(gen) == [2, 3] and built == [1]
    assert list(ex.map(factory, iter(()))) == [] and built == [1]


def test_local_run_job_is_one_in_process_worker():
    ex = Executor(ExecutorParams(backend="local", progress=False))
    got = ex.run_job(_job, {"x": 5}, workers=4)
    assert got["rank"] == 0 and got["world"] == 1 and got["x"] == 5
    assert got["reports"] and got["reports"][0]["loss"] == pytest.approx(got["reports"][0]["loss"])


@pytest.mark.slow
def test_ray_pool_is_sized_to_the_cluster_and_reused_across_maps():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not a package
    ex = Executor(ExecutorParams(backend="ray", progress=False, num_cpus=2))
    try:
        ex.start()
        first = list(ex.map(_Square(), range(20), Resources(cpus=1)))
        assert [v for v, _ in first] == [i * i for i in range(20)]
        pids = {pid for _, pid in first}
        assert os.getpid() not in pids and len(pids) <= 2
        started = ex.reset_stats()
        assert started["workers_started"] == started["pool_size"] == 2
        second = list(ex.map(_Square(), range(10), Resources(cpus=1)))
        assert {pid for _, pid in second} <= pids  # the same processes: nothing restarted
        assert ex.reset_stats()["workers_started"] == 0
        # a lazy stream of items: drawn a few ahead of the results, one worker per process
        drawn: list[int] = []

        def stream():
            for i in range(30):
                drawn.append(i)
                yield i

        results = ex.map(_Square(), stream(), Resources(cpus=1))
        got = [next(results) for _ in range(3)]
        assert [v for v, _ in got] == [0, 1, 4] and 3 <= len(drawn) <= 3 + 2 * 2 * 2 + 1
        got += list(results)
        assert [v for v, _ in got] == [i * i for i in range(30)] and len(drawn) == 30
        assert {pid for _, pid in got} <= pids and ex.reset_stats()["items"] == 30
        assert list(ex.map(_Square(), iter([]), Resources(cpus=1))) == []
        # an iterator's length hint sizes the pool it uses: a hint of 1, one worker
        hinted = ex.map(_Square(), _Hinted(iter(range(6)), 1), Resources(cpus=1))
        assert len({pid for _, pid in hinted}) == 1
        # a two-worker distributed job through Ray Train, after the pool gave its CPUs back
        got = ex.run_job(_job, {"x": 3}, workers=2, resources=Resources(cpus=0.5))
        assert got["rank"] == 0 and got["world"] == 2 and got["x"] == 3
    finally:
        ex.shutdown()


_DRIVER = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline.executor import Executor, Resources
from pipeline.params import ExecutorParams
ex = Executor(ExecutorParams(backend="ray", progress=False, num_cpus=1))
ex.start()
import ray
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
list(ex.map(lambda: (lambda x: x), [1, 2], Resources(cpus=1)))
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_processes_once_the_next_run_starts(tmp_path):
    env = {**os.environ, "FAKEFORGE_STATE": str(tmp_path / "state"), "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER.format(root=str(ROOT))], env=env,
                            stdout=subprocess.PIPE, text=True)
    session = proc.stdout.readline().strip()
    assert proc.stdout.readline().strip() == "ready"
    record = json.loads((tmp_path / "state" / f"{proc.pid}.json").read_text())
    orphans = (_session_pids(session) | set(record["pids"])) - {proc.pid}
    assert orphans, "the Ray instance should have processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    assert any(_alive(p) for p in orphans), "Ray outlived its driver (what this test is about)"
    # the next run, with the same state folder, stops them before starting its own Ray
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "import pipeline.executor as e; e._reap_orphans()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in orphans):
        time.sleep(0.5)
    left = [p for p in orphans if _alive(p)]
    assert not left, f"still alive: {left}"
