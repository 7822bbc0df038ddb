"""The one place that knows about Ray.

Stages hand the executor a *worker factory* (a picklable zero-argument callable that builds a
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
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm import tqdm

from pipeline.params import ExecutorParams

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

WorkerFactory = Callable[[], Callable[[Any], Any]]


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

    def shutdown(self) -> None:
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray = None
