"""Synthesize: forge real sources with the generators chosen in params.

For each shippable real source the stage draws `per_source` distinct generators of the
source's domain (plus the `aigc` ones, which take any source), weighted by per-generator
and per-domain weights, with a random stream seeded from (global seed, sample key); each
forgery's own seed derives from (global seed, forgery key). Per generator, the work runs
through the executor: GPU generators as actors asking for `num_gpus` with their batch size,
CPU ones as ordinary workers. After generation the stage pastes the source back outside the
dilated edit region (local edits) and encodes the result in the source's format at the
source's estimated JPEG quality, so that format is never a label.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from generators import registry
from generators.base import Forgery, SkipSample, Source
from pipeline import imageio
from pipeline.executor import Executor, Resources, chunked
from pipeline.params import Params
from pipeline.records import ManifestWriter, Record, content_key, counts, dumps_json, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)

DOMAIN_NAMES = ("document", "natural", "face", "aigc")
DEFAULT_JPEG_QUALITY = 95  # `imageio.encode_like`'s quality when the source's is unknown


@dataclass(frozen=True)
class GeneratorSpec:
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)  # passed to the generator's __init__
    device: str = "cpu"  # cpu | cuda | cuda:N; a cuda device runs as Ray actors with num_gpus
    num_gpus: float = 1.0  # per actor, when device is cuda
    batch_size: int = 1  # sources per generate_batch call (diffusers); CPU ones use 1


def _default_generators() -> dict[str, GeneratorSpec]:
    return {name: GeneratorSpec() for name in registry.REGISTRY}


@dataclass(frozen=True)
class SynthesizeParams:
    generators: dict[str, GeneratorSpec] = field(default_factory=_default_generators)
    domain_weights: dict[str, float] = field(default_factory=lambda: {d: 1.0 for d in DOMAIN_NAMES})
    per_source: int = 2  # forgeries per real source (distinct generators)
    paste_back: bool = True  # local edits: source pixels outside the dilated mask
    paste_back_dilate: int = 2  # px
    match_source_format: bool = True  # encode like the source (JPEG at its quality)
    max_sources: int | None = None  # cap, for quick runs

    def __post_init__(self) -> None:
        for name in self.generators:
            if name not in registry.REGISTRY:
                raise ValueError(
                    f"synthesize.generators: unknown generator {name!r}; "
                    f"valid generators: {', '.join(sorted(registry.REGISTRY))}"
                )
        for d in self.domain_weights:
            if d not in DOMAIN_NAMES:
                raise ValueError(
                    f"synthesize.domain_weights: unknown domain {d!r}; "
                    f"allowed: {', '.join(DOMAIN_NAMES)}"
                )
        if self.per_source < 0:
            raise ValueError("synthesize.per_source must be >= 0")


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


def plan(sources: list[Record], p: SynthesizeParams, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Which generator forges which source (and with which donor): a pure function."""
    infos = {name: _gen_info(name) for name in p.generators}
    by_domain: dict[str, list[Record]] = defaultdict(list)
    for r in sources:
        by_domain[r.domain].append(r)
    jobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for src in sources:
        names = [n for n, i in infos.items() if i.domain in (src.domain, "aigc")]
        w = np.array(
            [p.generators[n].weight * p.domain_weights.get(infos[n].domain, 1.0) for n in names]
        )
        names = [n for n, wi in zip(names, w) if wi > 0]
        w = w[w > 0]
        if not names or p.per_source == 0:
            continue
        rng = np.random.default_rng(derive_seed(seed, src.key, "mix"))
        k = min(p.per_source, len(names))
        chosen = rng.choice(len(names), size=k, replace=False, p=w / w.sum())
        for i in sorted(chosen):
            name = names[i]
            info = infos[name]
            donor = None
            if info.needs_donor:
                pool = [
                    d
                    for d in by_domain.get(info.donor_domain or src.domain, [])
                    if d.key != src.key
                ]
                if pool:
                    donor = pool[int(rng.integers(len(pool)))].to_dict()
            key = content_key(src.key, name)
            jobs[name].append(
                {
                    "source": src.to_dict(),
                    "donor": donor,
                    "key": key,
                    "seed": derive_seed(seed, key),
                }
            )
    return jobs


class _Factory:
    """Builds and sets up one generator per worker process (weights load once)."""

    def __init__(self, name: str, spec: GeneratorSpec, p: SynthesizeParams, data_dir: str):
        self.name, self.spec, self.p, self.data_dir = name, spec, p, data_dir

    def __call__(self):
        gen = registry.build(self.name, self.spec.params)
        gen.setup(self.spec.device)
        return _Worker(gen, self.p, Path(self.data_dir))


def _source(rec: Record, data_dir: Path, seed: int) -> Source:
    caption = rec.caption
    rgb = imageio.read_rgb(data_dir / rec.blob)
    return Source(
        key=rec.key, image=rgb, domain=rec.domain, seed=seed, format=rec.format, caption=caption
    )


class _Worker:
    def __init__(self, gen: Any, p: SynthesizeParams, data_dir: Path):
        self.gen, self.p, self.data_dir = gen, p, data_dir

    def __call__(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prepared, out = [], {}
        for job in jobs:
            src = Record(**job["source"])
            try:
                s = _source(src, self.data_dir, job["seed"])
                if job["donor"]:
                    d = Record(**job["donor"])
                    s.donor = _source(d, self.data_dir, job["seed"])
                prepared.append((job, src, s))
            except Exception as e:  # noqa: BLE001 - recorded on the row
                out[job["key"]] = self._failed(
                    job, src, "generator_error", f"cannot load source: {e}"
                )
        forgeries: list[Forgery | Exception] = []
        if prepared and hasattr(self.gen, "generate_batch") and len(prepared) > 1:
            rngs = [np.random.default_rng(job["seed"]) for job, _, _ in prepared]
            try:
                forgeries = list(self.gen.generate_batch([s for _, _, s in prepared], rngs))
            except Exception as e:  # noqa: BLE001 - fall back to one by one to isolate the bad one
                log.warning("%s: batch failed (%s); retrying one by one", self.gen.name, e)
                forgeries = []
        if len(forgeries) != len(prepared):
            forgeries = []
            for job, _, s in prepared:
                try:
                    forgeries.append(self.gen.generate(s, np.random.default_rng(job["seed"])))
                except Exception as e:  # noqa: BLE001
                    forgeries.append(e)
        for (job, src, s), f in zip(prepared, forgeries):
            if isinstance(f, SkipSample):
                out[job["key"]] = self._failed(job, src, "skipped", str(f) or "source unsuitable")
            elif isinstance(f, Exception):
                out[job["key"]] = self._failed(
                    job, src, "generator_error", f"{type(f).__name__}: {f}"
                )
            else:
                try:
                    out[job["key"]] = self._finish(job, src, s, f)
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
            donor_key=job["donor"]["key"] if job.get("donor") else None,
        )

    def _failed(self, job, src, status, error) -> Record:
        return self._base(job, src).replace(status=status, error=error)

    def _finish(self, job: dict[str, Any], src: Record, s: Source, f: Forgery) -> Record:
        img = np.asarray(f.image)
        h, w = s.image.shape[:2]
        if img.shape != (h, w, 3) or img.dtype != np.uint8:
            raise ValueError(
                f"generator returned {img.shape} {img.dtype}; expected {(h, w, 3)} uint8"
            )
        mask = np.asarray(f.mask, bool)
        if mask.shape != (h, w):
            raise ValueError(f"generator returned a mask of shape {mask.shape}; expected {(h, w)}")
        if f.label not in ("tampered", "synthetic"):
            raise ValueError(f"generator returned label {f.label!r}; allowed: tampered, synthetic")
        if not mask.any():
            return self._failed(job, src, "skipped", "generator returned an empty mask")
        local = f.local and f.label == "tampered"
        if local and self.p.paste_back:
            img = imageio.paste_back(s.image, img, mask, self.p.paste_back_dilate)
        quality = None
        if self.p.match_source_format:
            data, ext = imageio.encode_like(img, src.format, src.jpeg_quality)
            if ext == "jpg":
                quality = src.jpeg_quality or DEFAULT_JPEG_QUALITY  # what encode_like used
        else:
            data, ext = imageio.encode_like(img, "png")
        sha = hashlib.sha256(data).hexdigest()
        blob = f"synthesize/blobs/{job['key']}.{ext}"
        imageio.write_bytes(self.data_dir / blob, data)
        requested = None
        if local and f.mask_known:
            requested = f"synthesize/requested/{job['key']}.png"
            imageio.write_bytes(self.data_dir / requested, imageio.encode_mask(mask))
        provenance = dict(f.params)
        if f.model_revision:
            provenance["model_revision"] = f.model_revision
        if f.source_region is not None:
            provenance["source_region"] = f.source_region
        provenance["encoded_like_source"] = self.p.match_source_format
        provenance["source_format"] = src.format
        provenance["source_jpeg_quality"] = src.jpeg_quality
        rec = self._base(job, src).replace(
            label=f.label,
            model_id=f.model_id,
            params=dumps_json(provenance),
            width=w,
            height=h,
            format=ext,
            sha256=sha,
            phash=str(imagehash.phash(Image.fromarray(img))),
            nbytes=len(data),
            mode="RGB",
            jpeg_quality=quality,
            blob=blob,
            requested_mask_blob=requested,
        )
        if f.label == "synthetic":
            return rec.replace(mask_source="full")
        return rec.replace(parent_blob=src.blob, mask_source="derived")


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    p: SynthesizeParams = params.synthesize
    data_dir = params.data
    manifest = Path(out) / "manifest.parquet"
    sources = [r for r in iter_records(inputs["manifest"]) if is_source(r)]
    sources.sort(key=lambda r: r.key)
    if p.max_sources is not None:
        sources = sources[: p.max_sources]
    jobs = plan(sources, p, params.seed)
    forged: list[Record] = []
    per_generator: dict[str, dict[str, int]] = {}
    for name in p.generators:
        todo = jobs.get(name, [])
        if not todo:
            continue
        spec = p.generators[name]
        gpu = spec.device.startswith("cuda")
        size = spec.batch_size if gpu else max(1, min(spec.batch_size, params.executor.batch_size))
        res = Resources(cpus=1, gpus=spec.num_gpus if gpu else 0.0)
        factory = _Factory(name, spec, p, str(data_dir))
        n_ok = 0
        for rows in executor.map(factory, chunked(todo, size), res, desc=f"synthesize {name}"):
            for row in rows:
                rec = Record(**row)
                n_ok += rec.status == "ok"
                forged.append(rec)
        per_generator[name] = {"planned": len(todo), "ok": n_ok}
    with ManifestWriter(manifest) as w:
        for r in iter_records(inputs["manifest"]):
            w.write(r)
        w.write_all(forged)
    metrics = counts(forged)
    metrics["sources"] = len(sources)
    metrics["per_generator"] = per_generator
    return metrics


STAGE = Stage(
    name="synthesize",
    help="forge real sources with the configured generators",
    params=SynthesizeParams,
    run=run,
    reads=("dedup", "ingest"),  # ingest: the real images' bytes
    writes={"synthesize": "synthesize"},
    uses=("seed",),
    code=("generators",),
)
