"""Dedup: the Hamming index against brute force, and the stage on real photos and their copies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import broken_corpus, local_executor, make_params, write_manifest
from PIL import Image, ImageEnhance
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage import data as skdata
from sklearn.datasets import load_sample_image

from pipeline import dedup
from pipeline.cli import run_stage
from pipeline.dedup import (
    DedupParams,
    HammingIndex,
    _Permutation,
    brute_force_pairs,
    plan_tables,
    union_find,
)
from pipeline.records import read_records

# --------------------------------------------------------------------------- index


def flip(hashes: np.ndarray, dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rank = rng.random((len(hashes), 64)).argsort(axis=1).argsort(axis=1)
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    return hashes ^ np.bitwise_or.reduce(np.where(rank < dist[:, None], weights, np.uint64(0)),
                                         axis=1)


def planted(n: int, threshold: int, seed: int) -> np.ndarray:
    """Random hashes plus copies at every distance 0..threshold+4 (the last ones just miss)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    dist = np.repeat(np.arange(threshold + 5), 12)
    src = rng.integers(0, n, len(dist))
    # chains: copies of copies, so components are larger than pairs
    chain = flip(base[src[:20]], np.full(20, max(threshold, 1)), rng)
    return np.concatenate([base, flip(base[src], dist, rng), chain, flip(chain, dist[:20], rng)])


def pair_set(a: np.ndarray, b: np.ndarray) -> set[tuple[int, int]]:
    return {(int(x), int(y)) for x, y in zip(np.minimum(a, b), np.maximum(a, b))}


@pytest.mark.parametrize(("threshold", "capacity"), [
    (0, 10), (1, 10), (3, 2000), (5, 10), (8, 10), (8, 2000), (8, DedupParams().capacity),
    (10, 2000), (13, 10),
])
def test_index_pairs_equal_brute_force(threshold, capacity):
    hashes = planted(1500, threshold, seed=threshold)
    index = HammingIndex(hashes, threshold, capacity)
    a, b = index.pairs()
    ba, bb = brute_force_pairs(index.unique, threshold)
    want = pair_set(ba, bb)
    if threshold:
        assert len(want) >= 12 * threshold  # the planted pairs are there to be found
    assert pair_set(a, b) == want
    assert len(a) == len(want)  # no pair twice
    # every distance reported is really within the threshold, none beyond is reported
    assert (np.bitwise_count(index.unique[a] ^ index.unique[b]) <= threshold).all()
    # the spanning forest keeps the components
    fa, fb = index.pairs(spanning=True)
    ncomp, lab = connected_components(
        coo_matrix((np.ones(len(ba)), (ba, bb)), shape=(len(index),) * 2), directed=False)
    root = union_find(len(index), fa, fb)
    assert len(np.unique(root)) == ncomp
    assert len(set(zip(root.tolist(), lab.tolist()))) == ncomp  # same partition
    g = index.groups()
    assert len(g) == len(hashes) and (g == root[index.inverse]).all()


def test_dense_clusters_keep_components_with_a_spanning_forest():
    """Clusters where every hash is near every other: far more pairs than hashes."""
    rng = np.random.default_rng(5)
    centres = rng.integers(0, 2**64, 6, dtype=np.uint64)
    members = np.concatenate([flip(np.full(150, c), rng.integers(0, 4, 150), rng)
                              for c in centres])
    index = HammingIndex(members, 8, 10**6)
    a, b = index.pairs()
    assert len(a) > 10 * len(index)  # dense: the forest path is taken
    assert pair_set(a, b) == pair_set(*brute_force_pairs(index.unique, 8))
    fa, _ = index.pairs(spanning=True)
    assert len(fa) < 2 * len(index)  # at most a forest per task, not every pair
    g = index.groups()
    assert len(np.unique(g)) == 6
    for k in range(6):  # one label per cluster
        assert len(np.unique(g[k * 150 : (k + 1) * 150])) == 1


@pytest.mark.parametrize("threshold", [0, 4, 8, 12])
def test_query_equals_brute_force(threshold):
    rng = np.random.default_rng(100 + threshold)
    hashes = planted(2000, threshold, seed=threshold)
    index = HammingIndex(hashes, threshold, 5000)
    near = flip(hashes[rng.integers(0, len(hashes), 300)],
                rng.integers(0, threshold + 5, 300), rng)
    queries = np.concatenate([near, rng.integers(0, 2**64, 100, dtype=np.uint64)])
    qi, ui, dist = index.query(queries)
    d = np.bitwise_count(queries[:, None] ^ index.unique[None, :])
    want = set(zip(*(x.tolist() for x in np.nonzero(d <= threshold))))
    assert len(want) >= 40  # planted copies within reach (1 in 5 at threshold 0)
    assert set(zip(qi.tolist(), ui.tolist())) == want
    assert len(qi) == len(want)
    assert (dist == d[qi, ui]).all()
    e = index.query(np.empty(0, np.uint64))
    assert all(len(x) == 0 for x in e)


def test_permutation_puts_table_bits_on_top_and_inverts():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2**64, 4000, dtype=np.uint64)
    y = x.copy()
    y[::2] ^= np.uint64(1) << rng.integers(0, 64, 2000).astype(np.uint64)  # one bit off
    for table in plan_tables(8, 10**7)[::37] + plan_tables(3, 100):
        perm = _Permutation.of(table)
        px, py = perm.forward(x), perm.forward(y)
        assert (perm.inverse(px) == x).all()
        assert (np.bitwise_count(px ^ py) == np.bitwise_count(x ^ y)).all()
        mask = np.uint64(sum(((1 << w) - 1) << s for s, w in table.runs))
        same_key = (x & mask) == (y & mask)
        assert ((px ^ py) <= perm.low).tolist() == same_key.tolist()
        assert perm.bits == table.bits


def test_plan_covers_every_error_pattern_of_weight_threshold():
    """Pigeonhole check: any `threshold` flipped bits leave some table's bits untouched."""
    rng = np.random.default_rng(3)
    for threshold in (2, 5, 8, 11):
        tables = plan_tables(threshold, 10**6)
        masks = np.array([sum(((1 << w) - 1) << s for s, w in t.runs) for t in tables], np.uint64)
        errs = flip(np.zeros(3000, np.uint64), np.full(3000, threshold), rng)
        untouched = ((errs[:, None] & masks[None, :]) == 0).any(axis=1)
        assert untouched.all(), threshold


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="uint64"):
        HammingIndex(np.arange(5), 4)
    with pytest.raises(ValueError, match="threshold"):
        DedupParams(threshold=40)
    with pytest.raises(ValueError, match="uint64"):
        HammingIndex(np.arange(5, dtype=np.uint64), 4).query(np.arange(3))


def test_empty_and_single_inputs():
    for hashes in (np.empty(0, np.uint64), np.array([7], np.uint64), np.array([7, 7], np.uint64)):
        index = HammingIndex(hashes, 8, 100)
        a, _ = index.pairs()
        assert a.size == 0
        assert len(index.groups()) == len(hashes) and len(set(index.groups().tolist())) <= 1
        assert index.query(np.array([6], np.uint64))[0].size == min(len(hashes), 1)
    with pytest.raises(ValueError, match="sorted"):
        dedup.table_pairs(np.array([5, 3], np.uint64), plan_tables(2, 10)[0], 2)


def test_parse_phash_marks_bad_values_invalid():
    import pyarrow as pa

    h, ok = dedup.parse_phash(pa.array(["ffffffffffffffff", None, "xyz", "0000000000000001", ""]))
    assert ok.tolist() == [True, False, False, True, False]
    assert h[0] == np.uint64(2**64 - 1) and h[3] == 1


# --------------------------------------------------------------------------- real photos


def _rgb(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.dtype != np.uint8:
        a = a.astype(float)
        a = (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8)
    im = Image.fromarray(a[..., :3])
    im.thumbnail((256, 256), Image.LANCZOS)  # small and quick; pHash sees 32x32 anyway
    return im


def photos() -> dict[str, Image.Image]:
    return {
        "chelsea": _rgb(skdata.chelsea()), "coffee": _rgb(skdata.coffee()),
        "astronaut": _rgb(skdata.astronaut()), "rocket": _rgb(skdata.rocket()),
        "camera": _rgb(skdata.camera()), "page": _rgb(skdata.page()), "text": _rgb(skdata.text()),
        "motorcycle": _rgb(skdata.stereo_motorcycle()[0]),
        "ihc": _rgb(skdata.immunohistochemistry()), "hubble": _rgb(skdata.hubble_deep_field()),
        "china": _rgb(load_sample_image("china.jpg")),
        "flower": _rgb(load_sample_image("flower.jpg")),
    }


def _crop(im: Image.Image, frac: float) -> Image.Image:
    dx, dy = round(im.width * frac / 2), round(im.height * frac / 2)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


# the copies dedup must group with their original: (transform, file format, save options)
COPIES = {
    "resized": (lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR), "PNG", {}),
    "jpeg70": (lambda im: im, "JPEG", {"quality": 70}),
    "bright": (lambda im: ImageEnhance.Brightness(im).enhance(1.2), "PNG", {}),
    "crop2": (lambda im: _crop(im, 0.02), "PNG", {}),
}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """Originals (PNG), four kinds of copies of each, and two byte-identical files, ingested."""
    tmp = tmp_path_factory.mktemp("dedup")
    folder = tmp / "photos"
    folder.mkdir()
    for name, im in photos().items():
        im.save(folder / f"{name}.png")
        for kind, (f, fmt, opts) in COPIES.items():
            f(im).save(folder / f"{name}_{kind}.{fmt.lower()}", fmt, **opts)
    same = (folder / "coffee.png").read_bytes()
    (folder / "renamed").mkdir()
    (folder / "renamed" / "coffee copy.png").write_bytes(same)
    (folder / "renamed" / "another name.png").write_bytes(same)
    manifest = write_manifest(tmp / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "test", "path": str(folder)}])
    params = make_params(tmp, [manifest])
    run_stage("ingest", params, local_executor())
    return tmp, manifest


def _dedup(tmp: Path, manifest: Path, tag: str, **opts):
    params = make_params(tmp / tag, [manifest], dedup=opts)
    out = tmp / tag / "dedup"
    inputs = {"manifest": tmp / "data" / "ingest" / "manifest.parquet"}
    metrics = dedup.run(params, inputs, out, local_executor())
    return metrics, read_records(out / "manifest.parquet")


def _photo(uri: str) -> str:
    name = Path(uri).stem
    return "coffee" if name in ("coffee copy", "another name") else name.split("_")[0]


def test_copies_join_their_original_and_distinct_photos_stay_apart(ingested):
    tmp, manifest = ingested
    metrics, recs = _dedup(tmp, manifest, "default")
    assert len(recs) == len(photos()) * (1 + len(COPIES)) + 2
    assert sum(r.format == "jpeg" or r.format == "jpg" for r in recs) == len(photos())
    assert all(r.phash and r.group_id for r in recs)
    by_photo: dict[str, list] = {}
    for r in recs:
        by_photo.setdefault(_photo(r.uri), []).append(r)
    assert len(by_photo) == len(photos())
    groups = {name: {r.group_id for r in rs} for name, rs in by_photo.items()}
    for name, g in groups.items():  # every copy lands in its original's group
        assert len(g) == 1, (name, [(Path(r.uri).name, r.phash) for r in by_photo[name]])
    assert len({next(iter(g)) for g in groups.values()}) == len(groups)  # no two photos merged
    by_key = {r.key: r for r in recs}
    for name, rs in by_photo.items():
        kept = [r for r in rs if r.status == "ok"]
        assert len(kept) == 1, name
        rep = kept[0]
        for r in rs:
            if r is rep:
                continue
            assert r.status == "duplicate", (name, r.uri)
            assert rep.key in r.error and by_key[rep.key].status == "ok"
            assert r.stage == "dedup"
            if r.sha256 == rep.sha256:
                assert r.error.startswith("exact duplicate of")
            else:
                assert r.error.startswith("near duplicate of") and "phash distance" in r.error
    fig = metrics["dedup"]
    assert fig["groups"] == len(photos())
    # the three byte-identical coffee files are exact copies of each other; whether they are
    # "exact" or "near" duplicates depends on which coffee file is the representative
    assert fig["exact_duplicates"] + fig["near_duplicates"] == len(recs) - len(photos())
    assert fig["near_duplicates"] >= 4 * len(photos()) - 2
    assert metrics["by_status"] == {"ok": len(photos()),
                                    "duplicate": len(recs) - len(photos())}
    groups_file = pq.read_table(tmp / "default" / "dedup" / "groups.parquet").to_pylist()
    assert len(groups_file) == len(recs)
    assert sum(g["representative"] for g in groups_file) == len(photos())
    assert {g["key"]: g["group_id"] for g in groups_file} == {r.key: r.group_id for r in recs}
    # the CLI path gives the same rows (deterministic) and writes the metrics file
    run_stage("dedup", make_params(tmp, [manifest]), local_executor())
    again = read_records(tmp / "data" / "dedup" / "manifest.parquet")
    assert [(r.key, r.group_id, r.status, r.error) for r in again] == [
        (r.key, r.group_id, r.status, r.error) for r in recs]
    saved = json.loads((tmp / "metrics" / "dedup.json").read_text())
    assert saved["dedup"]["groups"] == len(photos())


def test_exact_duplicates_are_named_as_such(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    ims = photos()
    for name in ("rocket", "page"):
        ims[name].save(folder / f"{name}.png")
    same = (folder / "rocket.png").read_bytes()
    for name in ("copy of rocket.png", "zz.png", "sub/rocket.png"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(same)
    manifest = write_manifest(tmp_path / "corpus.yaml", [
        {"name": "files", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "test", "path": str(folder)}])
    run_stage("ingest", make_params(tmp_path, [manifest]), local_executor())
    for tag, near in (("near", True), ("exact_only", False)):
        metrics, recs = _dedup(tmp_path, manifest, tag, near=near)
        sha = next(r.sha256 for r in recs if r.uri == "rocket.png")
        rocket = [r for r in recs if r.sha256 == sha]
        assert len(rocket) == 4 and len(recs) == 5
        assert len({r.group_id for r in rocket}) == 1
        kept = [r for r in rocket if r.status == "ok"]
        assert len(kept) == 1
        for r in rocket:
            if r is not kept[0]:
                assert r.status == "duplicate"
                assert r.error == f"exact duplicate of {kept[0].key}"
        page = next(r for r in recs if r.uri.endswith("page.png"))
        assert page.status == "ok" and page.group_id != kept[0].group_id
        assert metrics["dedup"]["exact_duplicates"] == 3
        assert metrics["dedup"]["near_duplicates"] == 0


def test_near_false_groups_only_identical_bytes_or_phash(ingested):
    tmp, manifest = ingested
    _, recs = _dedup(tmp, manifest, "exact_only", near=False)
    # expected partition: rows joined when they share the sha256 or the exact pHash
    a, b = [], []
    for field in ("sha256", "phash"):
        first: dict[str, int] = {}
        for i, r in enumerate(recs):
            j = first.setdefault(getattr(r, field), i)
            a.append(j)
            b.append(i)
    root = union_find(len(recs), np.array(a), np.array(b))
    got = {}
    for i, r in enumerate(recs):
        got.setdefault(r.group_id, set()).add(int(root[i]))
    assert all(len(v) == 1 for v in got.values())
    assert len(got) == len(set(root.tolist()))
    assert len(got) > len(photos())  # fewer merges than with near=True
    assert sum(r.status == "ok" for r in recs) == len(got)


def test_keep_duplicates_keeps_rows_ok_with_one_group(ingested):
    tmp, manifest = ingested
    _, recs = _dedup(tmp, manifest, "keep", keep_duplicates=True)
    assert all(r.status == "ok" for r in recs)
    by_photo: dict[str, set] = {}
    for r in recs:
        by_photo.setdefault(_photo(r.uri), set()).add(r.group_id)
    assert all(len(g) == 1 for g in by_photo.values())
    assert len(set().union(*by_photo.values())) == len(photos())
    by_key = {r.key: r for r in recs}
    marked = [(r, {"duplicate_of": r.duplicate_of, "duplicate": r.duplicate_kind})
              for r in recs if r.duplicate_of]
    assert len(marked) == len(recs) - len(photos())
    for r, m in marked:
        rep = by_key[m["duplicate_of"]]
        assert rep.group_id == r.group_id and rep.duplicate_of is None
        assert m["duplicate"] == ("exact" if rep.sha256 == r.sha256 else "near")


def test_broken_rows_pass_through_untouched(tmp_path):
    root = tmp_path / "mixed"
    expected = broken_corpus(root)
    photos()["coffee"].save(root / "good.png")
    manifest = write_manifest(tmp_path / "corpus.yaml", [
        {"name": "mixed", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "x", "path": str(root)}])
    params = make_params(tmp_path, [manifest], ingest={"max_pixels": 50_000_000})
    run_stage("ingest", params, local_executor())
    metrics = run_stage("dedup", params, local_executor())
    recs = read_records(params.data / "dedup" / "manifest.parquet")
    before = read_records(params.data / "ingest" / "manifest.parquet")
    assert [(r.key, r.status, r.error) for r in recs] == [(r.key, r.status, r.error)
                                                          for r in before]
    status = {Path(r.uri).name: r for r in recs}
    for name, reason in expected.items():
        assert status[name].status == reason and status[name].group_id is None
    assert status["good.png"].status == "ok" and status["good.png"].group_id
    assert metrics["dedup"]["groups"] == 1
