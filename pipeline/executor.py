"""The one place that knows about Ray.

Two verbs:
- `map(factory, items, resources)`: many small independent pieces of work (ingest a file,
  forge a sample, write a shard), results in item order;
- `run_job(fn, config, workers, resources)`: one distributed job of `workers` cooperating
  processes (a training loop): Ray Train's `TorchTrainer` on the `ray` backend, a direct
  call in this process on `local`. `fn(ctx, config)` gets a `JobContext` (rank, world size,
  device, `report`, `prepare_model`) so it never imports Ray.

For `map`, stages hand the executor a *worker factory* (a picklable zero-argument callable that builds a
worker once per process, e.g. loading model weights) and a list of work items; the executor
returns the results in item order. Resources are data: `Resources(cpus=..., gpus=...)`.

Backends:
- `ray`: on a local Ray instance, or on an existing cluster named by `executor.address` or
  `$RAY_ADDRESS`. CPU work runs as ordinary Ray tasks asking for fractional CPUs (so work
  never deadlocks behind other tasks on a small machine); each worker process builds the
  worker once and reuses it for later tasks of the same factory. GPU work runs on an actor
  pool, one actor per `num_gpus` slice, each holding its model for the whole stage.
- `local`: everything in this process, for debugging and tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from pipeline.params import ExecutorParams

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

WorkerFactory = Callable[[], Callable[[Any], Any]]


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


_WORKERS: dict[str, Callable[[Any], Any]] = {}  # per process: factory object id -> worker


def _call_cached(boxed_factory: list[Any], item: Any) -> Any:
    """Body of a Ray task: builds the worker once per process and factory, then applies it.

    The factory comes as an object reference inside a list, so Ray does not resolve it and
    its id can key the cache; it is fetched from the object store once per process.
    """
    import ray

    ref = boxed_factory[0]
    key = ref.hex()
    worker = _WORKERS.get(key)
    if worker is None:
        if len(_WORKERS) >= 4:  # a few stages' workers at most; drop the oldest
            _WORKERS.pop(next(iter(_WORKERS)))
        worker = _WORKERS[key] = ray.get(ref)()
    return worker(item)


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    size = max(1, int(size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class Executor:
    def __init__(self, params: ExecutorParams | None = None):
        self.params = params or ExecutorParams()
        self._ray = None

    @property
    def backend(self) -> str:
        return self.params.backend

    def _ensure_ray(self):
        if self._ray is not None:
            return self._ray
        import ray

        if not ray.is_initialized():
            address = self.params.address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {
                "ignore_reinit_error": True,
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = self.params.num_cpus or os.cpu_count() or 1
            log.info("starting ray (%s)", address or "local instance")
            ray.init(**kwargs)
        self._ray = ray
        return ray

    def map(
        self,
        factory: WorkerFactory,
        items: Sequence[Any],
        resources: Resources = Resources(),
        desc: str = "",
    ) -> Iterator[Any]:
        """Applies a worker built by `factory` to each item; yields results in item order."""
        items = list(items)
        bar = tqdm(
            total=len(items),
            desc=desc,
            disable=not self.params.progress or not items,
            unit="task",
            leave=False,
        )
        try:
            if self.backend == "local" or not items:
                worker = factory() if items else None
                for item in items:
                    yield worker(item)
                    bar.update(1)
            else:
                yield from self._map_ray(factory, items, resources, bar)
        finally:
            bar.close()

    def _map_ray(self, factory, items, resources: Resources, bar) -> Iterator[Any]:
        ray = self._ensure_ray()
        from ray.util import ActorPool

        cluster = ray.cluster_resources()
        cpus_total = cluster.get("CPU", 1.0)
        gpus_total = cluster.get("GPU", 0.0)
        if resources.gpus > 0:
            if gpus_total < resources.gpus:
                raise RuntimeError(
                    f"workers ask for {resources.gpus} GPU each but the Ray cluster has "
                    f"{gpus_total}; set the generator's device to 'cpu' or add GPU nodes"
                )
            n = int(gpus_total // resources.gpus)
        else:
            # fractional CPUs: leave room for the driver and Ray's own tasks
            n = max(1, int(cpus_total // max(resources.cpus, 0.01)))
            n = min(n, int(cpus_total) or 1)
        if resources.max_workers:
            n = min(n, resources.max_workers)
        n = max(1, min(n, len(items)))

        if resources.gpus == 0:
            # ordinary tasks; a bounded window keeps memory flat and results in order
            task = ray.remote(_call_cached).options(num_cpus=min(resources.cpus, 0.5))
            boxed = [ray.put(factory)]
            window = 2 * n
            pending: list[Any] = []
            for item in items:
                pending.append(task.remote(boxed, item))
                if len(pending) >= window:
                    yield ray.get(pending.pop(0))
                    bar.update(1)
            for ref in pending:
                yield ray.get(ref)
                bar.update(1)
            return

        @ray.remote
        class _Worker:
            def __init__(self, factory):
                self.fn = factory()

            def __call__(self, item):
                return self.fn(item)

        opts: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus}
        actors = [_Worker.options(**opts).remote(factory) for _ in range(n)]
        pool = ActorPool(actors)
        try:
            for result in pool.map(lambda a, item: a.__call__.remote(item), items):
                bar.update(1)
                yield result
        finally:
            for a in actors:
                ray.kill(a)

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
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray = None
