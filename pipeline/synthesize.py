"""Synthesize: forge real sources with the generators chosen in params.

Planning (`plan`, a pure function of the sources, params and seed): each shippable real
source gets `per_source` distinct generators of its domain (plus the `aigc` ones, which take
any source). First every generator with weight > 0 gets one source that can take it (the
scarcest generators first, on the sources with the most free slots), so that a small corpus
still exercises every generator; the remaining slots are drawn by per-generator and
per-domain weights from a random stream seeded by (global seed, source key). Each forgery's
own seed derives from (global seed, forgery key).

Rounds of the data loop (`plan_from`): each plan file (`pipeline.focus`) lists jobs
(generator, source) of its round; they are forged on top of the stage's own plan, from
`train` sources only (val and test stay fixed), with keys derived from (source, generator,
round, job index), so no key repeats one of another round, and donors from train. With
`reuse`, an earlier output row with the same key, seed, generator version, parent and donor
(and whose files exist) is kept instead of forged again.

Forged rows stream into the output manifest as workers return them (after the input rows,
generator by generator), so memory does not grow with the number of forgeries. Planning is
global (the cover step looks at every source), so the driver holds each source's dozen
fields that the planner and the workers read as Arrow columns (`SourceTable`, about 300
bytes, plus its key and domain as Python objects) and each job as two indices (16 bytes); a
job's dict, with its source and donor as `SourceRow`s, is made when its window of jobs goes
to the executor (`bench/bench_synth_plan.py`).

Per generator, the work runs through the executor: GPU generators as actors asking for
`num_gpus` with their batch size, CPU ones as ordinary workers. After generation the stage
pastes the source back outside the dilated edit region (local edits) and encodes the result
the way its source is encoded (`pipeline.imageio.encode_like`: container, mode, JPEG tables
and subsampling, metadata), so that nothing in the file but the forgery tells it from a real
image. Full syntheses ship at the size their generator made them. Where that codec is lossy
(JPEG, lossy WebP), the forged pixels as made (in the file's mode) are kept where they differ
from the source (`precodec_blob`, a PNG patch of that box; never shipped; the whole frame
when the whole frame changed), so `masks` knows the edit apart from the codec's echo around
it, and a frame changed everywhere by a little (under the codec's noise) from a local edit.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import logging
import re
import sys
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from generators import registry
from generators.base import Forgery, SkipSample, Source
from pipeline import imageio
from pipeline.executor import Executor, Resources, chunked
from pipeline.params import Params
from pipeline.records import (
    SCHEMA,
    ManifestWriter,
    Record,
    content_key,
    counts,
    dumps_json,
    iter_records,
)
from pipeline.stage import Stage

log = logging.getLogger(__name__)

DOMAIN_NAMES = ("document", "natural", "face", "aigc")
_WINDOW_JOBS = 20_000  # a generator's jobs made into dicts at a time (one map call per generator)
DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class GeneratorSpec:
    weight: float = 1.0
    # the generator's own frozen params dataclass (`generators.registry.params_class(name)`);
    # a mapping in the params file is built into it when the params load
    params: Any = None
    device: str = "cpu"  # cpu | cuda | cuda:N; a cuda device runs as Ray actors with num_gpus
    num_gpus: float = 1.0  # per actor, when device is cuda
    batch_size: int = 1  # sources per generate_batch call (diffusers); CPU ones use 1

    def __post_init__(self) -> None:
        if not np.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"weight {self.weight!r}; allowed: a finite number >= 0")
        if not np.isfinite(self.num_gpus) or self.num_gpus <= 0:
            raise ValueError(f"num_gpus {self.num_gpus!r}; allowed: a finite number > 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size!r}; allowed: an integer >= 1")
        if not isinstance(self.device, str) or not DEVICE.match(self.device):
            raise ValueError(f"device {self.device!r}; allowed: cpu, cuda, cuda:N, mps")


def _default_generators() -> dict[str, GeneratorSpec]:
    return {name: GeneratorSpec() for name in registry.REGISTRY}


@dataclass(frozen=True)
class SynthesizeParams:
    generators: dict[str, GeneratorSpec] = field(default_factory=_default_generators)
    domain_weights: dict[str, float] = field(default_factory=lambda: {d: 1.0 for d in DOMAIN_NAMES})
    per_source: int = 2  # forgeries per real source (distinct generators)
    paste_back: bool = True  # local edits: source pixels outside the dilated mask
    paste_back_dilate: int = 2  # px
    match_source_format: bool = True  # encode like the source (container, mode, tables, metadata)
    max_sources: int | None = None  # cap, for quick runs
    # plans of further rounds (JSON files written by `focus` or the data loop): their jobs
    # are forged on top of this stage's own plan, each with keys of its round
    plan_from: tuple[str, ...] = ()
    # keep the forgeries of an earlier run of this stage whose key, seed and generator
    # version match a planned job (and whose files exist) instead of forging them again;
    # the data loop sets it, so a round forges only its new jobs
    reuse: bool = False

    def __post_init__(self) -> None:
        specs = {}
        for name, spec in self.generators.items():
            if name not in registry.REGISTRY:
                raise ValueError(
                    f"synthesize.generators: unknown generator {name!r}; "
                    f"valid generators: {', '.join(sorted(registry.REGISTRY))}"
                )
            spec = spec if spec is not None else GeneratorSpec()
            built = registry.make_params(name, spec.params, f"generators.{name}.params")
            specs[name] = dataclasses.replace(spec, params=built)
        object.__setattr__(self, "generators", specs)
        for d, w in self.domain_weights.items():
            if d not in DOMAIN_NAMES:
                raise ValueError(
                    f"synthesize.domain_weights: unknown domain {d!r}; "
                    f"allowed: {', '.join(DOMAIN_NAMES)}"
                )
            if not np.isfinite(w) or w < 0:
                raise ValueError(
                    f"synthesize.domain_weights.{d}: {w!r}; allowed: a finite number >= 0"
                )
        if self.per_source < 0:
            raise ValueError(f"synthesize.per_source {self.per_source!r}; allowed: >= 0")
        if self.paste_back_dilate < 0:
            raise ValueError(
                f"synthesize.paste_back_dilate {self.paste_back_dilate!r}; allowed: >= 0"
            )
        if self.max_sources is not None and self.max_sources < 0:
            raise ValueError(f"synthesize.max_sources {self.max_sources!r}; allowed: null or >= 0")


def derive_seed(global_seed: int, *parts: object) -> int:
    """A 63-bit seed from (global seed, sample id, ...): stable across runs and machines."""
    h = hashlib.sha256(str((global_seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def is_source(r: Record) -> bool:
    return r.status == "ok" and r.label == "real" and r.blob is not None and r.kind != "blocklist"


@dataclass(frozen=True)
class _GenInfo:
    name: str
    domain: str
    needs_donor: bool
    donor_domain: str | None


def _gen_info(name: str) -> _GenInfo:
    cls = registry.generator_class(name)
    return _GenInfo(
        name,
        cls.domain,
        bool(getattr(cls, "needs_donor", False)),
        getattr(cls, "donor_domain", None),
    )


def _weights(p: SynthesizeParams, infos: dict[str, _GenInfo]) -> dict[str, float]:
    """Each generator's effective weight (its own times its domain's); only those above 0."""
    w = {n: p.generators[n].weight * p.domain_weights.get(i.domain, 1.0) for n, i in infos.items()}
    return {n: v for n, v in w.items() if v > 0}


class SourceRow(NamedTuple):
    """What the workers read of a real source (a full Record, with its 60 fields and its
    hashes, takes 4x the memory); the stage holds these fields as columns (`SourceTable`)."""

    key: str
    source: str
    source_id: str | None
    group_id: str | None
    parent_key: str | None
    license: str | None
    domain: str | None
    blob: str
    format: str | None
    caption: str | None
    jpeg_quality: int | None
    exif_orientation: int | None


_SHARED = ("source", "license", "domain", "format")  # few distinct values: one string each


class SourceTable(Sequence):
    """The sources, sorted by key: their `SourceRow` fields as Arrow columns in manifest
    order (about 300 bytes a source, where a list of `SourceRow`s takes 600) and the order
    that sorts them. A row is made when it is read (`rows` makes many at once); `keys` and
    `domains` are what planning reads of every source, held as Python lists."""

    def __init__(self, table: pa.Table, order: pa.Array | None = None):
        self.table = table  # one chunk per column: `take` does not concatenate them again
        self.order = order if order is not None else pc.sort_indices(table.column("key"))
        self.keys: list[str] = pc.take(table.column("key"), self.order).to_pylist()
        self.domains: list[str | None] = [
            sys.intern(d) if isinstance(d, str) else d
            for d in pc.take(table.column("domain"), self.order).to_pylist()]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return self.rows(range(start, stop, step))
            return SourceTable(self.table, self.order.slice(start, max(0, stop - start)))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.rows([i])[0]

    def __iter__(self) -> Iterator[SourceRow]:
        for start in range(0, len(self), 1 << 16):
            yield from self.rows(range(start, min(len(self), start + (1 << 16))))

    def rows(self, idx: Iterable[int]) -> list[SourceRow]:
        """The rows at these positions (in key order), in the order given."""
        t = self.table.take(self.order.take(pa.array(list(idx), pa.int64())))
        return list(map(SourceRow._make, zip(*(t.column(n).to_pylist()
                                                for n in SourceRow._fields))))


def load_sources(manifest: str | Path) -> SourceTable:
    """The sources of a manifest (`is_source`: ok, real, stored, not a blocklist item) sorted
    by key, read batch by batch and only the columns `SourceRow` has."""
    pf = pq.ParquetFile(manifest)
    names = set(pf.schema_arrow.names)
    want = [c for c in (*SourceRow._fields, "status", "label", "kind") if c in names]
    types = {n: SCHEMA.field(n).type for n in SourceRow._fields}
    parts: dict[str, list[pa.Array]] = {n: [] for n in SourceRow._fields}

    def column(batch: pa.RecordBatch, name: str) -> pa.Array:
        i = batch.schema.get_field_index(name)
        if i < 0:
            return pa.nulls(batch.num_rows, types.get(name, pa.string()))
        col = batch.column(i)
        return col.cast(types[name]) if name in types and col.type != types[name] else col

    for batch in pf.iter_batches(columns=want, batch_size=1 << 16, use_threads=False):
        col = functools.partial(column, batch)
        keep = pc.and_(pc.and_(pc.equal(col("status"), "ok"), pc.equal(col("label"), "real")),
                       pc.and_(pc.is_valid(col("blob")),
                               pc.fill_null(pc.not_equal(col("kind"), "blocklist"), True)))
        keep = pc.fill_null(keep, False)
        if not pc.any(keep).as_py():
            continue
        for name in SourceRow._fields:
            parts[name].append(pc.filter(col(name), keep))
        del batch, col, keep
        # the batch's buffers go back to the system: the allocator would keep them (about
        # 300 bytes a source read, measured) and grow to the whole manifest's size
        pa.default_memory_pool().release_unused()
    # one array per column, a column at a time: the batches' pieces go as each is joined
    columns = {}
    for name in SourceRow._fields:
        got = parts.pop(name)
        columns[name] = pa.concat_arrays(got) if got else pa.array([], types[name])
        del got
    table = pa.table(columns)
    del columns
    pa.default_memory_pool().release_unused()
    return SourceTable(table)


def _keys(sources: Sequence[Any]) -> list[str]:
    keys = getattr(sources, "keys", None)
    return keys if isinstance(keys, list) else [s.key for s in sources]


def _domains(sources: Sequence[Any]) -> list[str | None]:
    domains = getattr(sources, "domains", None)
    return domains if isinstance(domains, list) else [s.domain for s in sources]


class Jobs(Sequence):
    """One generator's planned jobs, in source order. Held as indices into the planner's
    sources (16 bytes a job); a job's dict (source, donor, key, seed) is made when it is
    read, so a plan of 10^7 jobs does not hold 10^7 dicts. Jobs of a round's plan
    (`extend`) are kept as the dicts they came as, after the base plan's."""

    def __init__(self, name: str, sources: Sequence[Any], seed: int):
        self.name, self.sources, self.seed = name, sources, seed
        self.src, self.donor = array("q"), array("q")
        self.extra: list[dict[str, Any]] = []

    def add(self, source: int, donor: int) -> None:
        self.src.append(source)
        self.donor.append(donor)

    def extend(self, jobs: Iterable[dict[str, Any]]) -> None:
        self.extra.extend(jobs)

    def __len__(self) -> int:
        return len(self.src) + len(self.extra)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return self._window(start, max(start, stop))
            return [self._job(j) for j in range(start, stop, step)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._job(i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), _WINDOW_JOBS):
            yield from self[start : start + _WINDOW_JOBS]

    def _job(self, i: int) -> dict[str, Any]:
        if i >= len(self.src):
            return self.extra[i - len(self.src)]
        src, d = self.sources[self.src[i]], self.donor[i]
        key = content_key(src.key, self.name)
        return {"source": src, "donor": self.sources[d] if d >= 0 else None, "key": key,
                "seed": derive_seed(self.seed, key)}

    def _window(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Jobs start..stop, their sources and donors read at once (`SourceTable.rows`)."""
        rows = getattr(self.sources, "rows", None)
        base = max(start, min(stop, len(self.src)))
        if rows is None or base == start:
            return [self._job(j) for j in range(start, stop)]
        src, donor = self.src[start:base], self.donor[start:base]
        need = sorted(set(src).union(d for d in donor if d >= 0))
        row = dict(zip(need, rows(need)))
        out = []
        for i, d in zip(src, donor):
            key = content_key(row[i].key, self.name)
            out.append({"source": row[i], "donor": row[d] if d >= 0 else None, "key": key,
                        "seed": derive_seed(self.seed, key)})
        return out + [self._job(j) for j in range(base, stop)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(self) != len(other):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Jobs({self.name!r}, {len(self)} jobs)"


def plan(sources: Sequence[Any], p: SynthesizeParams, seed: int,
         split_of: Callable[[Any], str | None] | None = None) -> dict[str, Jobs]:
    """Which generator forges which source (and with which donor): a pure function.

    `sources` are sorted by key (`SourceRow`s or Records). `split_of` gives the split a
    source's group will be in (`split.plan_groups`): donors are drawn from the source's own
    split, so a splice never carries pixels across splits. Per source only its split and
    its donor's index are held while planning; the jobs are indices (`Jobs`)."""
    split_of = split_of or (lambda r: "any")
    infos = {name: _gen_info(name) for name in p.generators}
    weights = _weights(p, infos)
    if p.per_source == 0 or not weights:
        return {}
    keys, domains = _keys(sources), _domains(sources)
    fits = {d: [n for n in weights if infos[n].domain in (d, "aigc")] for d in set(domains)}
    slots = {d: min(p.per_source, len(f)) for d, f in fits.items()}
    chosen: dict[int, list[str]] = {}  # the sources the cover step gave a generator
    # 1. cover: every generator gets one source that can take it, scarcest generators first,
    #    each on the source with the most free slots (ties: a stable hash of seed and names)
    per_domain = Counter(domains)
    takers = {n: sum(c for d, c in per_domain.items() if n in fits[d]) for n in weights}
    for name in sorted(weights, key=lambda n: (takers[n], n)):
        best, best_i = None, -1
        for i, (key, domain) in enumerate(zip(keys, domains)):
            free = slots[domain] - len(chosen.get(i, ()))
            if free <= 0 or name not in fits[domain]:
                continue
            rank = (free, -derive_seed(seed, key, name))
            if best is None or rank > best:
                best, best_i = rank, i
        if best_i >= 0:
            chosen.setdefault(best_i, []).append(name)
    # 2. donors for the generators that paste another image in: from the same split as the
    #    source (a group in no split, near a blocklist item, gets no donor)
    splits = [split_of(s) for s in sources]
    partners = _partners(keys, domains, seed, splits)
    by_domain: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for i, domain in enumerate(domains):
        by_domain[domain, splits[i]].append(i)
    # 3. fill the remaining slots by weight, without repeating a generator on a source, and
    #    make the jobs
    order = {n: i for i, n in enumerate(p.generators)}
    probs: dict[tuple[str, ...], list[float]] = {}
    jobs: dict[str, Jobs] = {}
    for i, (key, domain) in enumerate(zip(keys, domains)):
        names = chosen.get(i, [])
        free = [n for n in fits[domain] if n not in names]
        k = slots[domain] - len(names)
        if k > 0 and free:
            prob = probs.get(tuple(free))
            if prob is None:  # few distinct lists of free generators: normalised once each
                w = np.array([weights[n] for n in free])
                prob = probs[tuple(free)] = (w / w.sum()).tolist()
            picked = _draw(np.random.default_rng(derive_seed(seed, key, "mix")), prob, k)
            names = names + [free[j] for j in sorted(picked)]
        for name in sorted(names, key=order.__getitem__):
            info = infos[name]
            donor = -1
            if info.needs_donor and info.donor_domain in (None, domain):
                donor = int(partners[i])
            elif info.needs_donor and splits[i] is not None and by_domain.get(
                (info.donor_domain, splits[i])
            ):
                pool = by_domain[info.donor_domain, splits[i]]
                donor = pool[derive_seed(seed, key, name, "donor") % len(pool)]
            if name not in jobs:
                jobs[name] = Jobs(name, sources, seed)
            jobs[name].add(i, donor)
    return jobs


def _draw(rng: np.random.Generator, prob: list[float], k: int) -> list[int]:
    """`rng.choice(len(prob), size=k, replace=False, p=prob)` as numpy computes it (draw
    k - found uniforms, zero the found weights, search the normalised cumulative sum, keep
    new indices in order of first draw, repeat), in plain Python: the same indices from
    the same stream in a fifth of the time, which was most of planning (tests compare the
    two on random weights, sizes and seeds)."""
    p = list(prob)
    found: list[int] = []
    while len(found) < k:
        draws = [rng.random() for _ in range(k - len(found))]
        for j in found:
            p[j] = 0.0
        cdf = list(itertools.accumulate(p))
        last = cdf[-1]
        cdf = [c / last for c in cdf]
        seen = set(found)
        for x in draws:
            j = bisect.bisect_right(cdf, x)
            if j not in seen:
                seen.add(j)
                found.append(j)
    return found


def load_plan(path: Path) -> dict[str, Any]:
    """A round's plan (`pipeline.focus`): {"round": N, "jobs": [{"generator", "source"}], ...}."""
    import json

    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"synthesize.plan_from {path}: cannot read a plan ({e})") from e
    if not isinstance(plan, dict) or not isinstance(plan.get("round"), int) or plan["round"] < 1 \
            or not isinstance(plan.get("jobs"), list):
        raise ValueError(f"synthesize.plan_from {path}: a plan is a JSON object with an integer "
                         "`round` >= 1 and a `jobs` list")
    for job in plan["jobs"]:
        if not isinstance(job, dict) or not isinstance(job.get("generator"), str) \
                or not isinstance(job.get("source"), str):
            raise ValueError(f"synthesize.plan_from {path}: job {job!r}; each job is "
                             '{"generator": NAME, "source": KEY}')
    return plan


def plan_round(plan: dict[str, Any], sources: Sequence[Any], p: SynthesizeParams,
               seed: int, split_of: Callable[[Any], str | None]
               ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """The jobs of one round's plan, and the reasons for jobs that cannot run. Only sources
    in `train` are forged (val and test stay fixed across rounds); keys carry the round and
    the job's index, so they never collide with the base plan or another round.

    `sources` are sorted by key, as `plan` takes them; a job's source is found by binary
    search and the train sources of each domain are held as positions (8 bytes each), so a
    round costs no row per source."""
    r = plan["round"]
    infos = {name: _gen_info(name) for name in p.generators}
    keys, domains = _keys(sources), _domains(sources)
    train: dict[str | None, array] = defaultdict(lambda: array("q"))
    for i, s in enumerate(sources):  # in key order
        if split_of(s) == "train":
            train[domains[i]].append(i)
    jobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    problems = []
    for i, job in enumerate(plan["jobs"]):
        name = job["generator"]
        at = bisect.bisect_left(keys, job["source"])
        src = sources[at] if at < len(keys) and keys[at] == job["source"] else None
        if name not in infos:
            raise ValueError(f"plan of round {r}: generator {name!r} is not in "
                             f"synthesize.generators ({', '.join(p.generators)})")
        info = infos[name]
        if src is None:
            problems.append(f"round {r} job {i}: source {job['source']} is not a shippable real "
                            "image of this manifest")
            continue
        if split_of(src) != "train":
            problems.append(f"round {r} job {i}: source {src.key} is in {split_of(src)}, not "
                            "train (rounds forge train sources only)")
            continue
        if info.domain not in (src.domain, "aigc"):
            problems.append(f"round {r} job {i}: {name} forges {info.domain} sources, "
                            f"{src.key} is {src.domain}")
            continue
        key = content_key(src.key, name, "round", r, i)
        donor = None
        if info.needs_donor:
            # the train sources of the donor domain, without the source itself
            pool = train.get(info.donor_domain or src.domain, array("q"))
            own = bisect.bisect_left(pool, at)
            skip = own < len(pool) and pool[own] == at
            if len(pool) - skip:
                j = derive_seed(seed, key, "donor") % (len(pool) - skip)
                donor = sources[pool[j + (skip and j >= own)]]
        jobs[name].append({"source": src, "donor": donor,
                           "key": key, "seed": derive_seed(seed, key), "round": r})
    return dict(jobs), problems


def _partners(keys: list[str], domains: list[str | None], seed: int,
              splits: list[str | None]) -> np.ndarray:
    """The donor of each source (an index, -1: none): sources of a domain and split in a
    seeded order, paired two by two (the odd one out joins the last pair), so a donor is
    always in its source's split and each image lends its pixels to at most two others."""
    by_domain: dict[tuple[str | None, str], list[int]] = defaultdict(list)
    for i, domain in enumerate(domains):
        if splits[i] is not None:
            by_domain[domain, splits[i]].append(i)
    partners = np.full(len(keys), -1, np.int64)
    for pool in by_domain.values():
        ring = sorted(pool, key=lambda i: derive_seed(seed, keys[i], "pair"))
        for i, r in enumerate(ring):
            j = i ^ 1 if (i ^ 1) < len(ring) else i - 1
            if 0 <= j != i:
                partners[r] = ring[j]
    return partners


def why_no_work(sources: Sequence[Any], p: SynthesizeParams, jobs: dict[str, Jobs]
                ) -> list[str]:
    """Why configured generators got nothing to do: the reasons a run's log should show."""
    infos = {name: _gen_info(name) for name in p.generators}
    weights = _weights(p, infos)
    domains = sorted({str(d) for d in _domains(sources)})
    if not sources:
        return []
    if not p.generators:
        return ["synthesize.generators is empty"]
    if p.per_source == 0:
        return ["synthesize.per_source is 0"]
    if not weights:
        return [
            "every configured generator has weight 0 (its own weight times its domain's in "
            f"synthesize.domain_weights): {', '.join(p.generators)}"
        ]
    reasons = []
    for name in weights:
        if not jobs.get(name) and not any(infos[name].domain in (d, "aigc") for d in domains):
            reasons.append(
                f"{name} forges {infos[name].domain} sources and the sources are {', '.join(domains)}"
            )
    return reasons


class _Factory:
    """Builds and sets up one generator per worker process (weights load once)."""

    def __init__(self, name: str, spec: GeneratorSpec, p: SynthesizeParams, data_dir: str):
        self.name, self.spec, self.p, self.data_dir = name, spec, p, data_dir

    def __call__(self):
        gen = registry.build(self.name, self.spec.params)
        gen.setup(self.spec.device)
        return _Worker(gen, self.p, Path(self.data_dir))


def _source(rec: Record, data_dir: Path, seed: int) -> tuple[Source, bytes]:
    """The decoded source handed to the generator, and its stored bytes (to encode like)."""
    data = (data_dir / rec.blob).read_bytes()
    src = Source(
        key=rec.key,
        image=imageio.decode(data),
        domain=rec.domain,
        seed=seed,
        format=rec.format,
        caption=rec.caption,
    )
    return src, data


class _Worker:
    def __init__(self, gen: Any, p: SynthesizeParams, data_dir: Path):
        self.gen, self.p, self.data_dir = gen, p, data_dir

    def __call__(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prepared, out = [], {}
        for job in jobs:
            src = job["source"]
            try:
                s, data = _source(src, self.data_dir, job["seed"])
                if job["donor"]:
                    s.donor, _ = _source(job["donor"], self.data_dir, job["seed"])
                prepared.append((job, src, s, data))
            except Exception as e:  # noqa: BLE001 - recorded on the row
                out[job["key"]] = self._failed(
                    job, src, "generator_error", f"cannot load source: {e}"
                )
        forgeries: list[Forgery | Exception] = []
        if prepared and hasattr(self.gen, "generate_batch") and len(prepared) > 1:
            rngs = [np.random.default_rng(job["seed"]) for job, *_ in prepared]
            try:
                forgeries = list(self.gen.generate_batch([s for _, _, s, _ in prepared], rngs))
            except Exception as e:  # noqa: BLE001 - fall back to one by one to isolate the bad one
                log.warning("%s: batch failed (%s); retrying one by one", self.gen.name, e)
                forgeries = []
        if len(forgeries) != len(prepared):
            forgeries = []
            for job, _, s, _ in prepared:
                try:
                    forgeries.append(self.gen.generate(s, np.random.default_rng(job["seed"])))
                except Exception as e:  # noqa: BLE001
                    forgeries.append(e)
        for (job, src, s, data), f in zip(prepared, forgeries):
            if isinstance(f, SkipSample):
                out[job["key"]] = self._failed(job, src, "skipped", str(f) or "source unsuitable")
            elif isinstance(f, Exception):
                out[job["key"]] = self._failed(
                    job, src, "generator_error", f"{type(f).__name__}: {f}"
                )
            else:
                try:
                    out[job["key"]] = self._finish(job, src, s, data, f)
                except Exception as e:  # noqa: BLE001
                    out[job["key"]] = self._failed(
                        job, src, "generator_error", f"{type(e).__name__}: {e}"
                    )
        return [out[job["key"]].to_dict() for job in jobs]

    def _base(self, job: dict[str, Any], src: Record) -> Record:
        g = self.gen
        return Record(
            key=job["key"],
            source=src.source,
            source_id=src.source_id,
            group_id=src.group_id,
            # what the row would have been: a skipped GAN sample is still not a tampered one
            label="synthetic" if g.domain == "aigc" else "tampered",
            domain=g.domain if g.domain == "aigc" else src.domain,
            operation=g.operation,
            generator=g.name,
            generator_version=g.version,
            seed=job["seed"],
            license=src.license,
            uri=f"synthesize:{g.name}:{src.key}",
            kind="synthesized",
            parent_key=src.key,
            stage="synthesize",
            # a splice or face swap carries the donor's pixels: split keeps both groups together
            donor_key=job["donor"].key if job.get("donor") else None,
        )

    def _failed(self, job, src, status, error) -> Record:
        return self._base(job, src).replace(status=status, error=error)

    def _finish(
        self, job: dict[str, Any], src: Record, s: Source, data: bytes, f: Forgery
    ) -> Record:
        img, mask = np.asarray(f.image), np.asarray(f.mask, bool)
        if f.label not in ("tampered", "synthetic"):
            raise ValueError(f"generator returned label {f.label!r}; allowed: tampered, synthetic")
        local = f.local and f.label == "tampered"
        # a local edit keeps its source's size; a full synthesis ships at the size it was made
        h, w = s.image.shape[:2] if local else img.shape[:2]
        if img.ndim != 3 or img.shape != (h, w, 3) or img.dtype != np.uint8:
            raise ValueError(
                f"generator returned {img.shape} {img.dtype}; expected {(h, w, 3)} uint8"
            )
        if mask.shape != (h, w):
            raise ValueError(f"generator returned a mask of shape {mask.shape}; expected {(h, w)}")
        if not mask.any():
            return self._failed(job, src, "skipped", "generator returned an empty mask")
        if local and self.p.paste_back:
            img = imageio.paste_back(s.image, img, mask, self.p.paste_back_dilate)
        provenance = dict(f.params)
        if self.p.match_source_format:
            same = img.shape == s.image.shape
            enc = imageio.encode_like(img, data, s.image if same else None)
            provenance["encoding"] = enc.notes
        else:
            enc = imageio.Encoded(imageio.encode_png(img), "png", "RGB")
        sha = hashlib.sha256(enc.data).hexdigest()
        blob = f"synthesize/blobs/{job['key']}.{enc.ext}"
        imageio.write_bytes(self.data_dir / blob, enc.data)
        precodec = None
        made = enc.made if enc.made is not None else img
        if local and made.shape == s.image.shape and not np.array_equal(
                imageio.decode(enc.data), made):
            # a lossy codec moved pixels: the edit as made (in the file's mode) is kept where
            # it changed the source, so masks can tell the edit from the codec's echo around
            # it; also when it changed the whole frame, which a JPEG's noise can hide when
            # the change is small (a resampling, a VAE round trip)
            patch = imageio.encode_patch(s.image, made)
            if patch is not None:
                precodec = f"synthesize/precodec/{job['key']}.png"
                imageio.write_bytes(self.data_dir / precodec, patch)
        requested = None
        if local and f.mask_known:
            requested = f"synthesize/requested/{job['key']}.png"
            imageio.write_bytes(self.data_dir / requested, imageio.encode_mask(mask))
        if f.model_revision:
            provenance["model_revision"] = f.model_revision
        if f.source_region is not None:
            provenance["source_region"] = f.source_region
        provenance["encoded_like_source"] = self.p.match_source_format
        provenance["source_format"] = src.format
        provenance["source_jpeg_quality"] = src.jpeg_quality
        # the source's quantisation tables are reused: its quality estimate holds for the copy
        quality = src.jpeg_quality if enc.ext == "jpg" and src.format == "jpg" else None
        rec = self._base(job, src).replace(
            label=f.label,
            model_id=f.model_id,
            params=dumps_json(provenance),
            width=w,
            height=h,
            format=enc.ext,
            sha256=sha,
            phash=str(imagehash.phash(Image.fromarray(img))),
            nbytes=len(enc.data),
            mode=enc.mode,
            jpeg_quality=quality,
            exif_orientation=src.exif_orientation if enc.notes.get("exif") else None,
            blob=blob,
            requested_mask_blob=requested,
            precodec_blob=precodec,
        )
        if f.label == "synthetic":
            return rec.replace(mask_source="full")
        return rec.replace(parent_blob=src.blob, mask_source="derived")


class _Hinted:
    """An iterator with a length hint (`operator.length_hint`), for sizing a worker pool."""

    def __init__(self, it: Iterator[Any], hint: int):
        self.it, self.hint = it, hint

    def __iter__(self) -> Iterator[Any]:
        return self.it

    def __length_hint__(self) -> int:
        return self.hint


def _write_rows(w: ManifestWriter, source_manifest: Path, p: SynthesizeParams,
                jobs: dict[str, Jobs], prior: dict[str, Record], executor: Executor,
                data_dir: Path, batch_size: int, summary: Counter,
                per_generator: dict[str, dict[str, int]]) -> None:
    """The input rows, then each generator's rows (reused or forged) in plan order."""
    for r in iter_records(source_manifest):
        w.write(r)
    for name in p.generators:
        todo = jobs.get(name, [])
        if not todo:
            continue
        spec = p.generators[name]
        gpu = spec.device.startswith("cuda")
        size = spec.batch_size if gpu else max(1, min(spec.batch_size, batch_size))
        res = Resources(cpus=1, gpus=spec.num_gpus if gpu else 0.0)
        factory = _Factory(name, spec, p, str(data_dir))
        version = registry.generator_class(name).version
        n_ok = n_reused = 0
        # per job in plan order: the earlier row it reuses, or None (forged now)
        slots: deque[Record | None] = deque()

        def forge_items(todo=todo, name=name, version=version, slots=slots, size=size):
            """The jobs to forge, in chunks; jobs become dicts a window at a time."""
            for start in range(0, len(todo), _WINDOW_JOBS):
                forge = []
                for j in todo[start : start + _WINDOW_JOBS]:
                    old = prior.get(j["key"])
                    if _reusable(old, j, name, version, data_dir):
                        slots.append(old)
                    else:
                        slots.append(None)
                        forge.append(j)
                yield from chunked(forge, size)

        def in_plan_order(forged: Iterator[Record], slots=slots
                          ) -> Iterator[tuple[Record, bool]]:
            """(row, reused) for reused and forged rows in plan order, whatever the
            window size (a worker returns one row per job, in job order)."""
            for rec in forged:
                while slots[0] is not None:
                    yield slots.popleft(), True
                slots.popleft()
                yield rec, False
            while slots:
                yield slots.popleft(), True

        # one map call per generator: its workers are built once, whatever the windows
        chunks = _Hinted(forge_items(), -(-len(todo) // size))  # at most: sizes the pool
        batches = executor.map(factory, chunks, res, desc=f"synthesize {name}")
        for rec, reused in in_plan_order(Record(**row) for rows in batches for row in rows):
            n_ok += rec.status == "ok"
            n_reused += reused
            summary[_Summary(rec.status, rec.domain, rec.operation, rec.generator,
                             rec.label, rec.split, rec.model_id)] += 1
            w.write(rec)
        per_generator[name] = {"planned": len(todo), "ok": n_ok, "reused": n_reused}


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    p: SynthesizeParams = params.synthesize
    data_dir = params.data
    manifest = Path(out) / "manifest.parquet"
    sources = load_sources(inputs["manifest"])
    available = len(sources)
    if p.max_sources is not None:
        sources = sources[: p.max_sources]
    from pipeline.split import plan_groups

    groups = plan_groups(inputs["manifest"], params.split, params.seed)
    jobs = plan(sources, p, params.seed, groups.of_record)
    rounds: dict[int, int] = {}
    plan_problems: list[str] = []
    if p.plan_from:
        for path in p.plan_from:
            extra, problems = plan_round(load_plan(params.resolve(path)), sources, p,
                                         params.seed, groups.of_record)
            plan_problems += problems
            for name, todo in extra.items():
                jobs.setdefault(name, Jobs(name, sources, params.seed)).extend(todo)
                for job in todo:
                    rounds[job["round"]] = rounds.get(job["round"], 0) + 1
        for problem in plan_problems:
            log.warning("synthesize: %s", problem)
        # a round's keys carry the round: only two plans of one round can repeat a key
        keys = [job["key"] for todo in jobs.values() for job in todo.extra]
        if len(set(keys)) != len(keys):  # two plans of the same round
            dup = next(k for k, c in Counter(keys).items() if c > 1)
            raise ValueError(f"synthesize.plan_from: key {dup} planned twice (two plans of "
                             "the same round?)")
    prior = _prior_rows(manifest) if p.reuse else {}
    if available and not sources:
        log.warning("synthesize: 0 forgeries planned: synthesize.max_sources is 0")
    elif sources:
        reasons = why_no_work(sources, p, jobs)
        if not any(jobs.values()):
            log.warning(
                "synthesize: 0 forgeries planned for %d sources: %s",
                len(sources),
                "; ".join(reasons),
            )
        for reason in reasons if any(jobs.values()) else ():
            log.warning("synthesize: a generator got no work: %s", reason)
    # forged rows stream into the manifest as they come; only their counts stay in memory
    summary: Counter = Counter()
    per_generator: dict[str, dict[str, int]] = {}
    # rows written before a failure (a worker lost, the run stopped) are kept beside the
    # manifest, so a rerun with `reuse` forges only the rest
    partial = manifest.with_name("manifest.partial.parquet")
    try:
        with ManifestWriter(manifest, partial=partial) as w:
            _write_rows(w, inputs["manifest"], p, jobs, prior, executor, data_dir,
                        params.executor.batch_size, summary, per_generator)
    except BaseException:
        if partial.exists():
            log.warning("synthesize: stopped; the %d rows written so far are in %s (a rerun "
                        "with synthesize.reuse: true forges only the rest)",
                        pq.ParquetFile(partial).metadata.num_rows, partial)
        raise
    partial.unlink(missing_ok=True)
    metrics = counts(k for k, c in summary.items() for _ in range(c))
    metrics["sources"] = len(sources)
    metrics["per_generator"] = per_generator
    metrics["stand_ins"] = stand_ins = _stand_ins(
        k for k, c in summary.items() for _ in range(c))
    if p.plan_from:
        metrics["rounds"] = {str(k): v for k, v in sorted(rounds.items())}
        metrics["plan_problems"] = plan_problems
    metrics["reused"] = sum(v["reused"] for v in per_generator.values())
    if stand_ins:
        log.warning(
            "synthesize: %d forgeries come from random-weight stand-in models (%s): their "
            "pixels are noise-like, fit for testing the plumbing, not for training; set "
            "synthesize.generators.<name>.params.model to a checkpoint",
            sum(c for v in stand_ins.values() for c in v.values()),
            ", ".join(
                f"{name} {c} ({mid})" for name, v in stand_ins.items() for mid, c in v.items()
            ),
        )
    return metrics


def _prior_rows(manifest: Path) -> dict[str, Record]:
    """The forgeries of this stage's previous output, by key: its manifest, then the rows a
    stopped run left in `manifest.partial.parquet` (newer: they win)."""
    out: dict[str, Record] = {}
    for path in (manifest, manifest.with_name("manifest.partial.parquet")):
        if path.exists():
            out.update((r.key, r) for r in iter_records(path) if r.kind == "synthesized")
    return out


def _reusable(r: Record | None, job: dict[str, Any], name: str, version: str,
              data_dir: Path) -> bool:
    if r is None or r.seed != job["seed"] or r.generator != name \
            or r.generator_version != version or r.parent_key != job["source"].key:
        return False
    if (r.donor_key or None) != (job["donor"].key if job["donor"] else None):
        return False
    if r.status != "ok":
        return r.status == "skipped"  # a deterministic refusal; errors are retried
    files = [r.blob, r.requested_mask_blob, r.precodec_blob]
    return all(f is None or (data_dir / f).exists() for f in files)


class _Summary(NamedTuple):
    """What the metrics count of a forged row."""

    status: str | None
    domain: str | None
    operation: str | None
    generator: str | None
    label: str | None
    split: str | None
    model_id: str | None


def _stand_ins(rows: Iterable[Any]) -> dict[str, dict[str, int]]:
    """{generator: {model_id: count}} of the ok rows a random-weight stand-in made."""
    from generators.diffusion import is_stand_in

    found: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        if r.status == "ok" and is_stand_in(r.model_id):
            found[r.generator][r.model_id] += 1
    return {name: dict(c) for name, c in sorted(found.items())}


STAGE = Stage(
    name="synthesize",
    help="forge real sources with the configured generators",
    params=SynthesizeParams,
    run=run,
    reads=("dedup", "ingest"),  # ingest: the real images' bytes
    writes={"synthesize": "synthesize"},
    uses=("seed", "split"),  # donors come from their source's split
    code=("generators", "pipeline/split.py"),
)
