"""Splits: by near-duplicate group, ratios honoured and stratified by domain, a real image's
split independent of the forgeries, donor leaks caught, test_ood, blocklist; the streaming
planner equals an exact in-memory cut."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import local_executor, make_params

from pipeline import split
from pipeline.params import ParamsError, from_dict
from pipeline.records import Record, read_records
from pipeline.records import write_manifest as write_records

RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _corpus(n_groups: int, domain: str = "natural", copies_every: int = 3,
            prefix: str = "") -> list[Record]:
    """Real rows in near-duplicate groups; every `copies_every`-th group has a kept copy."""
    rows = []
    for g in range(n_groups):
        gid = f"{prefix}g{g:05d}"
        rows.append(Record(key=f"{prefix}r{g:05d}a", source="s", group_id=gid, domain=domain))
        if copies_every and g % copies_every == 0:
            rows.append(Record(key=f"{prefix}r{g:05d}b", source="s", group_id=gid, domain=domain))
    return rows


def _forge(real: list[Record], ops: tuple[str, ...], donor_step: int = 0) -> list[Record]:
    """Forgeries of each first copy, as the synthesize stage writes them (kind synthesized,
    the source's group); with `donor_step`, a splice whose donor is another group's photo."""
    firsts = [r for r in real if r.key.endswith("a")]
    out = []
    for i, r in enumerate(firsts):
        for op in ops:
            out.append(Record(key=f"f{r.key}{op}", source="s", label="tampered", domain=r.domain,
                              operation=op, generator=op, parent_key=r.key, group_id=r.group_id,
                              kind="synthesized"))
        if donor_step:
            donor = firsts[(i + donor_step) % len(firsts)]
            out.append(Record(key=f"f{r.key}splice", source="s", label="tampered",
                              domain=r.domain, operation="splice", generator="splice",
                              parent_key=r.key, group_id=r.group_id, donor_key=donor.key,
                              kind="synthesized"))
    return out


def _split(tmp_path: Path, rows: list[Record], seed: int = 0, **section) -> dict[str, Record]:
    params = make_params(tmp_path, [], seed=seed, split=section)
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "in.parquet"
    write_records(src, rows)
    out = tmp_path / f"split-{seed}"
    split.run(params, {"manifest": src}, out, local_executor())
    return {r.key: r for r in read_records(out / "manifest.parquet")}


def test_split_keeps_groups_and_forgeries_together(tmp_path):
    real = _corpus(60)
    rows = real + _forge(real, ("copy_move", "removal"))
    got = _split(tmp_path, rows)
    assert set(got) == {r.key for r in rows}  # nothing lost
    by_group: dict[str, set] = defaultdict(set)
    for r in got.values():
        by_group[r.group_id].add(r.split)
    assert all(len(s) == 1 for s in by_group.values()), "a near-duplicate group spans splits"
    for r in got.values():
        assert r.status == "ok" and r.split in ("train", "val", "test")
        if r.parent_key:
            assert r.split == got[r.parent_key].split


def test_split_is_deterministic_and_depends_on_seed(tmp_path):
    rows = _corpus(60)
    a = _split(tmp_path / "a", rows, seed=1)
    b = _split(tmp_path / "b", rows, seed=1)
    c = _split(tmp_path / "c", rows, seed=2)
    assert {k: r.split for k, r in a.items()} == {k: r.split for k, r in b.items()}
    assert {k: r.split for k, r in a.items()} != {k: r.split for k, r in c.items()}


def test_real_splits_do_not_depend_on_forgeries_and_match_group_splits(tmp_path):
    """Issue 14.6: adding forgeries or changing the generator mix never moves a real image,
    and `group_splits` on the corpus rows alone (what synthesize sees) gives the same."""
    real = _corpus(91) + _corpus(12, "face", prefix="f") + _corpus(5, "document", prefix="d")
    before = split.group_splits(real, split.SplitParams(), seed=0)
    runs = [
        _split(tmp_path / "none", real),
        _split(tmp_path / "mix1", real + _forge(real, ("copy_move",))),
        _split(tmp_path / "mix2", real + _forge(real, ("removal", "inpaint", "edit"), donor_step=7)),
        _split(tmp_path / "mix3", real + _forge(real, ("copy_move",), donor_step=1)),
    ]
    for got in runs:
        for r in real:
            assert got[r.key].split == before[r.group_id], r.key
    # the donor links of mix2/mix3 joined 15-group units before; no unit remains
    assert len(set(before.values())) == 3


def test_ratios_are_honoured_and_every_domain_reaches_every_split(tmp_path):
    """Issue 14.5: 91 natural groups, 12 face, 5 document, 2 aigc and 1 unknown."""
    real = (_corpus(91) + _corpus(12, "face", prefix="f") + _corpus(5, "document", prefix="d")
            + _corpus(2, "aigc", prefix="a", copies_every=0)
            + _corpus(1, None, prefix="u", copies_every=0))
    got = _split(tmp_path, real)
    for dom, n_groups in (("natural", 91), ("face", 12), ("document", 5)):
        rows = [r for r in got.values() if r.domain == dom]
        share = Counter(r.split for r in rows)
        assert set(share) == {"train", "val", "test"}, (dom, share)
        for s, ratio in RATIOS.items():
            # as close as group sizes allow: within one group (of at most 2 rows) per split,
            # or one group forced into an otherwise empty split
            assert abs(share[s] - ratio * len(rows)) <= max(2.0, len(rows) / n_groups * 1.5), \
                (dom, s, share)
    total = Counter(r.split for r in got.values())
    n = sum(total.values())
    assert abs(total["val"] / n - 0.1) < 0.03 and abs(total["test"] / n - 0.1) < 0.03


@pytest.mark.parametrize("n_groups,ratios,expect", [
    (3, RATIOS, {"train": 1, "val": 1, "test": 1}),
    (13, RATIOS, {"train": 10, "val": 2, "test": 1}),
    (4, {"train": 0.5, "test": 0.5}, {"train": 2, "test": 2}),
    (2, RATIOS, None),  # fewer groups than splits: two splits used, never three
    (5, {"train": 1.0}, {"train": 5}),
])
def test_no_split_is_empty_with_enough_groups(tmp_path, n_groups, ratios, expect):
    got = _split(tmp_path, _corpus(n_groups, copies_every=0), ratios=ratios)
    c = Counter(r.split for r in got.values())
    if expect is None:
        assert sum(c.values()) == 2 and len(c) <= 2
    else:
        assert c == Counter(expect)


def test_small_domains_are_pooled_so_no_split_is_empty(tmp_path):
    """Four domains of two groups each: no domain can fill three splits; the pool does."""
    real = []
    for d in ("natural", "face", "document", "aigc"):
        real += _corpus(2, d, prefix=d[0], copies_every=0)
    got = _split(tmp_path, real)
    assert set(Counter(r.split for r in got.values())) == {"train", "val", "test"}


def _exact(rows: list[Record], p: split.SplitParams, seed: int) -> dict[str, str]:
    """The cut the streaming planner must reproduce, computed the plain way: per domain,
    groups sorted by hash, each placed by its weight's midpoint."""
    w: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        w[r.domain][r.group_id] += 1
    out = {}
    for groups in w.values():
        order = sorted(groups, key=lambda g: split.group_hash(seed, g))
        total, acc = sum(groups.values()), 0
        for g in order:
            out[g] = split.choose((acc + groups[g] / 2) / total, p.ratios)
            acc += groups[g]
    return out


def test_streaming_planner_equals_the_exact_cut_on_a_large_corpus():
    """30,000 natural groups (banded: only the groups near a boundary are held in memory)
    and 8,000 face groups: every group lands where the exact in-memory cut puts it."""
    rng = np.random.default_rng(0)
    rows = []
    for dom, n in (("natural", 30000), ("face", 8000)):
        for g in range(n):
            for c in range(int(rng.integers(1, 4))):
                rows.append(Record(key=f"{dom}{g}_{c}", source="s", group_id=f"{dom}{g}",
                                   domain=dom))
    p = split.SplitParams(ratios={"train": 0.7, "val": 0.2, "test": 0.1})
    gs = split.plan_groups(rows, p, seed=3)
    assert gs.figures["domains"]["natural"]["mode"] == "banded"
    assert gs.figures["held_groups"] < 6000  # not the 38,000 groups
    exact = _exact(rows, p, 3)
    wrong = [g for g, s in exact.items() if gs.of_group(g) != s]
    assert not wrong, f"{len(wrong)} groups differ, e.g. {wrong[:3]}"
    weights = Counter()
    for r in rows:
        weights[gs.of_group(r.group_id)] += 1
    for s, ratio in p.ratios.items():
        assert abs(weights[s] / len(rows) - ratio) < 0.001


def test_forgery_whose_donor_is_in_another_split_is_a_donor_leak(tmp_path):
    """Old manifests: a splice's donor picked from any group. The forgery is not shipped
    (status donor_leak) when its donor's group is in another split; otherwise it is."""
    real = _corpus(40)
    forged = _forge(real, (), donor_step=1)
    forged.append(Record(key="orphan", source="s", label="tampered", domain="natural",
                         operation="splice", generator="splice", parent_key=real[0].key,
                         group_id=real[0].group_id, donor_key="missing", kind="synthesized"))
    got = _split(tmp_path, real + forged)
    leaks = 0
    for f in forged:
        r = got[f.key]
        donor = got.get(f.donor_key)
        if donor is None:
            assert r.status == "donor_leak" and "not in the manifest" in r.error
        elif donor.split == got[f.parent_key].split:
            assert r.status == "ok" and r.split == donor.split
        else:
            leaks += 1
            assert r.status == "donor_leak" and r.split is None
            assert donor.split in r.error and r.stage == "split"
    assert leaks >= 3
    # the real rows are where the corpus alone puts them
    alone = _split(tmp_path / "alone", real)
    assert all(got[r.key].split == alone[r.key].split for r in real)


def test_ood_generators_go_only_to_test_ood(tmp_path):
    real = _corpus(30)
    got = _split(tmp_path, real + _forge(real, ("removal", "copy_move")),
                 ood_generators=["removal"], ood_operations=["copy_move"])
    for r in got.values():
        if r.generator in ("removal", "copy_move"):
            assert r.split == "test_ood"
        else:
            assert r.split in ("train", "val", "test")


def test_blocklist_near_duplicates_and_their_forgeries_are_never_shipped(tmp_path):
    real = _corpus(10)
    rows = real + _forge(real, ("copy_move",), donor_step=1)
    rows.append(Record(key="bench1", source="benchmark", group_id="g00003", kind="blocklist",
                       status="blocklist"))
    got = _split(tmp_path, rows, ratios={"train": 1.0})
    for key in ("r00003a", "r00003b", "fr00003acopy_move", "fr00003asplice"):
        assert got[key].status == "blocklisted" and got[key].split is None
        assert "bench1" in got[key].error
    # a splice whose donor is the blocklisted photo carries its pixels: not shipped either
    assert got["fr00002asplice"].status == "blocklisted"
    assert "donor" in got["fr00002asplice"].error
    assert got["bench1"].split is None and got["bench1"].status == "blocklist"
    assert got["r00004a"].status == "ok" and got["r00004a"].split == "train"


def test_pairs_edit_follows_its_original(tmp_path):
    real = _corpus(20, copies_every=0)
    edits = [Record(key=f"e{i}", source="pairs", label="tampered", domain="natural",
                    operation="unknown", parent_key=r.key, group_id=f"own{i}", kind="pairs")
             for i, r in enumerate(real)]
    got = _split(tmp_path, real + edits)
    for e in edits:
        assert got[e.key].split == got[e.parent_key].split


@pytest.mark.parametrize("section,needle", [
    ({"ratios": {"train": 0.5, "val": 0.1}}, "must sum to 1"),
    ({"ratios": {"train": 0.9, "dev": 0.1}}, "unknown split 'dev'"),
])
def test_bad_split_params_are_rejected(section, needle):
    with pytest.raises(ParamsError, match=needle):
        from_dict({"split": section})
