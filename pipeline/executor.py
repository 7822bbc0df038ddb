"""The one place that knows about Ray.

Two verbs:
- `map(factory, items, resources)`: many small independent pieces of work (ingest a file,
  forge a sample, write a shard), results in item order;
- `run_job(fn, config, workers, resources)`: one distributed job of `workers` cooperating
  processes (a training loop): Ray Train's `TorchTrainer` on the `ray` backend, a direct
  call in this process on `local`. `fn(ctx, config)` gets a `JobContext` (rank, world size,
  device, `report`, `prepare_model`) so it never imports Ray.

For `map`, stages hand the executor a *worker factory* (a picklable zero-argument callable
that builds a worker once per process, e.g. loading model weights) and a list of work items
(stages batch their rows into chunks); the executor returns the results in item order.
Resources are data: `Resources(cpus=..., gpus=...)`.

Backends:
- `ray`: on a local Ray instance, or on an existing cluster named by `executor.address` or
  `$RAY_ADDRESS`. Work runs on long-lived actor pools, one per resource shape, sized to the
  cluster (`CPUs / cpus` actors for CPU work, `GPUs / gpus` for GPU work) and kept for the
  whole run, so each worker process imports its libraries and builds each stage's worker
  (models included) once. At most two items are in flight per actor. A local instance is
  started once per run; a driver killed with SIGKILL leaves a record, and the next run stops
  the orphaned processes.
- `local`: everything in this process, for debugging and tests.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from pipeline.params import ExecutorParams

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

WorkerFactory = Callable[[], Callable[[Any], Any]]
_NOTHING = object()


@dataclass
class JobContext:
    """What one process of a distributed job knows about itself (see `Executor.run_job`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str = "local"
    reported: list[dict[str, Any]] = field(default_factory=list)

    def report(self, metrics: dict[str, Any]) -> None:
        """Progress of the job (loss, step), kept on this process. Not passed to Ray Train,
        whose `report` is a barrier every rank must reach equally often."""
        self.reported.append(dict(metrics))

    def prepare_model(self, model: Any) -> Any:
        """The model on this process's device, wrapped for data-parallel training (DDP)
        when the job has several workers."""
        if self.backend == "ray" and self.world_size > 1:
            import ray.train.torch

            return ray.train.torch.prepare_model(model)
        return model.to(self.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()


JobFn = Callable[[JobContext, dict[str, Any]], Any]


def _job_entry(config: dict[str, Any]) -> Any:
    """Body of each Ray Train worker: builds the JobContext and runs the job function."""
    import ray.train
    import torch

    fn = config["__fn__"]
    ctx = ray.train.get_context()
    use_gpu = config["__use_gpu__"] and torch.cuda.is_available()
    local_rank = ctx.get_local_rank()
    jc = JobContext(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=local_rank,
        device=f"cuda:{local_rank}" if use_gpu else "cpu",
        backend="ray",
    )
    user = {k: v for k, v in config.items() if not k.startswith("__")}
    return fn(jc, user)  # Ray Train hands rank 0's return value to `Result.return_value`


@dataclass(frozen=True)
class Resources:
    """What one worker needs. `cpus` may be fractional; `gpus` > 0 places workers on GPUs."""

    cpus: float = 1.0
    gpus: float = 0.0
    max_workers: int | None = None


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    size = max(1, int(size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class _PoolWorker:
    """A long-lived Ray actor: builds each stage's worker once from its factory and applies
    it to the items it is sent. Actors live for the whole run (one pool per resource shape),
    so a run starts as many worker processes as the pool has actors, and each imports
    torch/diffusers and loads its models once."""

    def __init__(self, threads: int):
        # before anything imports torch/OpenCV: one thread per CPU the actor holds, so a pool
        # of N single-CPU actors does not oversubscribe N cores
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        self.threads = threads
        self._workers: dict[str, Callable[[Any], Any]] = {}

    def pid(self) -> int:
        return os.getpid()

    def call(self, boxed_factory: list[Any], item: Any) -> Any:
        import ray

        ref = boxed_factory[0]  # boxed: Ray hands the reference over unresolved
        key = ref.hex()
        worker = self._workers.get(key)
        if worker is None:
            if len(self._workers) >= 4:  # a few stages' workers at most; drop the oldest
                self._workers.pop(next(iter(self._workers)))
            try:
                import cv2

                cv2.setNumThreads(self.threads)
            except ImportError:  # pragma: no cover - OpenCV is a dependency
                pass
            worker = self._workers[key] = ray.get(ref)()
        return worker(item)


class _NoTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


@dataclass
class _Pool:
    actors: list[Any]
    pids: list[int]


class Executor:
    def __init__(self, params: ExecutorParams | None = None):
        self.params = params or ExecutorParams()
        self._ray = None
        self._pools: dict[tuple[float, float], _Pool] = {}
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    @property
    def backend(self) -> str:
        return self.params.backend

    def reset_stats(self) -> dict[str, Any]:
        """Returns the figures since the last reset (what a stage's metrics carry) and
        starts counting again: backend, work items, worker processes started, pool size."""
        old = self.stats
        self.stats = {"backend": self.backend, "items": 0, "workers_started": 0, "pool_size": 0}
        return old

    def start(self) -> None:
        """Starts (or joins) Ray now rather than at the first piece of work."""
        if self.backend == "ray":
            self._ensure_ray()

    def _ensure_ray(self):
        if self._ray is not None:
            return self._ray
        address = self.params.address or os.environ.get("RAY_ADDRESS")
        # a local instance keeps Ray's default token authentication; its notice about that
        # default is not printed on every run
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _NoTokenNotice()
        )
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "ignore_reinit_error": True,
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if address:
                kwargs["address"] = address
            else:
                _reap_orphans()
                kwargs["num_cpus"] = self.params.num_cpus or os.cpu_count() or 1
            log.info("starting ray (%s)", address or "local instance")
            ray.init(**kwargs)
            if not address:
                _record_instance()
        self._ray = ray
        return ray

    def map(
        self,
        factory: WorkerFactory,
        items: Iterable[Any],
        resources: Resources = Resources(),
        desc: str = "",
    ) -> Iterator[Any]:
        """Applies a worker built by `factory` to each item; yields results in item order.

        `items` may be any iterable, read lazily (a few items ahead of the results on Ray),
        so one call can stream any number of items with one worker per process: a stage
        that makes its items a window at a time hands the whole stream to one call."""
        total = len(items) if isinstance(items, Sized) else None
        # how many items to size a Ray pool for: the length, else the iterable's hint
        expect = total if total is not None else operator.length_hint(items, 0) or None
        it = iter(items)
        first = next(it, _NOTHING)
        if first is _NOTHING:
            return
        it = itertools.chain((first,), it)
        bar = tqdm(
            total=total,
            desc=desc,
            # bars on a terminal only: a log file gets the stages' summary lines, not
            # carriage-return frames of a bar
            disable=not self.params.progress or not sys.stderr.isatty(),
            unit="task",
            leave=False,
        )
        try:
            if self.backend == "local":
                worker = factory()
                for item in it:
                    self.stats["items"] += 1
                    result = worker(item)
                    bar.update(1)
                    yield result
            else:
                yield from self._map_ray(factory, it, expect, resources, bar)
        finally:
            bar.close()

    def _pool_size(self, resources: Resources, n_items: int) -> int:
        ray = self._ensure_ray()
        cluster = ray.cluster_resources()
        cpus_total = cluster.get("CPU", 1.0)
        gpus_total = cluster.get("GPU", 0.0)
        if resources.gpus > 0:
            if gpus_total < resources.gpus:
                raise RuntimeError(
                    f"workers ask for {resources.gpus} GPU each but the Ray cluster has "
                    f"{gpus_total}; set the generator's device to 'cpu' or add GPU nodes"
                )
            n = int(gpus_total // resources.gpus + 1e-9)
        else:
            n = max(1, int(cpus_total // max(resources.cpus, 0.01) + 1e-9))
        if resources.max_workers:
            n = min(n, resources.max_workers)
        return max(1, min(n, n_items))

    def _pool(self, resources: Resources, n: int) -> _Pool:
        """A pool of at least `n` actors of this resource shape, reusing the run's actors."""
        ray = self._ensure_ray()
        key = (float(resources.cpus), float(resources.gpus))
        pool = self._pools.get(key)
        if pool is None or len(pool.actors) < n:
            # actors of other shapes hold resources this pool needs: the stages run one
            # after the other, so those pools are idle; release them
            for other in [k for k in self._pools if k != key]:
                self._release(other)
            pool = pool or _Pool([], [])
            cls = ray.remote(_PoolWorker)
            threads = max(1, int(round(resources.cpus)))
            new = [
                cls.options(num_cpus=resources.cpus, num_gpus=resources.gpus).remote(threads)
                for _ in range(n - len(pool.actors))
            ]
            pids = ray.get([a.pid.remote() for a in new])
            pool.actors += new
            pool.pids += pids
            self.stats["workers_started"] += len(new)
            self._pools[key] = pool
        self.stats["pool_size"] = max(self.stats["pool_size"], len(pool.actors))
        return pool

    def _release(self, key: tuple[float, float]) -> None:
        pool = self._pools.pop(key, None)
        if pool is not None and self._ray is not None:
            for a in pool.actors:
                self._ray.kill(a)

    def _map_ray(self, factory, items: Iterator[Any], expect: int | None, resources: Resources,
                 bar) -> Iterator[Any]:
        """In item order, at most two items in flight per actor (bounded memory); items are
        drawn from the iterator only as actors free up. The pool is sized for `expect`
        items (None: unknown, the whole cluster)."""
        ray = self._ensure_ray()
        n = self._pool_size(resources, expect if expect is not None else sys.maxsize)
        actors = self._pool(resources, n).actors[:n]
        boxed = [ray.put(factory)]
        busy = {i: 0 for i in range(n)}
        in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (item index, actor index)
        done: dict[int, Any] = {}
        next_item = emitted = 0
        window = 2 * n
        exhausted = False
        while True:
            while not exhausted and next_item - emitted < 2 * window:
                a = min(busy, key=lambda i: (busy[i], i))
                if busy[a] >= 2:
                    break
                item = next(items, _NOTHING)
                if item is _NOTHING:
                    exhausted = True
                    break
                ref = actors[a].call.remote(boxed, item)
                in_flight[ref] = (next_item, a)
                busy[a] += 1
                next_item += 1
                self.stats["items"] += 1
            if not in_flight:
                break  # nothing left to submit or to wait for: everything was emitted
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                i, a = in_flight.pop(ref)
                busy[a] -= 1
                done[i] = ray.get(ref)
            while emitted in done:
                bar.update(1)
                yield done.pop(emitted)
                emitted += 1

    def run_job(
        self,
        fn: JobFn,
        config: dict[str, Any],
        workers: int = 1,
        resources: Resources = Resources(),
        name: str = "job",
        storage: str | os.PathLike | None = None,
    ) -> Any:
        """Runs `fn(ctx, config)` on `workers` cooperating processes; returns rank 0's result.

        `ray`: Ray Train's `TorchTrainer` with `ScalingConfig(num_workers=workers,
        use_gpu=resources.gpus > 0)`, on the local instance or the cluster this executor
        joined; torch.distributed is set up for the workers. `local`: one call in this
        process with `world_size=1`, whatever `workers` says.
        """
        if self.backend == "local":
            device = "cuda" if resources.gpus > 0 else "cpu"
            return fn(JobContext(device=device, backend="local"), dict(config))
        self._ensure_ray()
        for key in list(self._pools):  # the job's workers need the CPUs/GPUs idle actors hold
            self._release(key)
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        per_worker: dict[str, float] = {"CPU": resources.cpus}
        if resources.gpus > 0:
            per_worker["GPU"] = resources.gpus
        trainer = TorchTrainer(
            _job_entry,
            train_loop_config={**config, "__fn__": fn, "__use_gpu__": resources.gpus > 0},
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=resources.gpus > 0, resources_per_worker=per_worker
            ),
            run_config=RunConfig(
                name=name, storage_path=str(Path(storage).resolve()) if storage else None
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return result.return_value

    def shutdown(self) -> None:
        for key in list(self._pools):
            self._release(key)
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
            _forget_instance()
        self._ray = None


# --------------------------------------------------------------------------- orphans
# A driver killed with SIGKILL cannot shut its local Ray instance down. Each local instance
# is recorded (driver pid, Ray's own process ids) in a state folder; the next run that starts
# Ray stops the processes of instances whose driver is gone.

_STATE = Path(os.environ.get("FAKEFORGE_STATE", Path.home() / ".cache" / "fakeforge" / "ray"))


def _record_instance() -> None:
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - the only place that lists them
        pids = [p.process.pid for procs in node.all_processes.values() for p in procs]
        _STATE.mkdir(parents=True, exist_ok=True)
        (_STATE / f"{os.getpid()}.json").write_text(
            json.dumps({"driver": os.getpid(), "session": node.get_session_dir_path(),
                        "pids": pids})
        )
    except Exception as e:  # noqa: BLE001 - bookkeeping only; never fail a run on it
        log.debug("could not record the Ray instance: %s", e)


def _forget_instance() -> None:
    (_STATE / f"{os.getpid()}.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _reap_orphans() -> None:
    """Stops what is left of local Ray instances whose driver was killed."""
    import signal

    if not _STATE.is_dir():
        return
    for f in _STATE.glob("*.json"):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            continue
        if _alive(int(rec.get("driver", 0))):
            continue
        session = str(rec.get("session", ""))
        killed = 0
        for pid in _session_pids(session) | set(rec.get("pids", [])):
            if _alive(pid) and "ray" in _cmdline(pid):  # a recorded pid may have been reused
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
        if killed:
            log.warning("stopped %d processes left by a killed run (driver pid %s)",
                        killed, rec.get("driver"))
        f.unlink(missing_ok=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _session_pids(session: str) -> set[int]:
    """Processes of a Ray session: their command line names the session folder, or (agents
    and workers that renamed themselves `ray::...`) they hold files open in it."""
    if not session or not Path("/proc").is_dir():
        return set()
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        if session in _cmdline(pid):
            out.add(pid)
            continue
        try:
            fds = list((d / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd).startswith(session):
                    out.add(pid)
                    break
            except OSError:
                pass
    return out
