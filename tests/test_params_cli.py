from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from pipeline import params as params_mod
from pipeline.params import ParamsError
from pipeline.stages import names as stage_names


def test_checked_in_params_match_code_defaults():
    """params.yaml is the defaults in code plus the few documented `make repro` overrides,
    each commented (regenerate: `python -m pipeline defaults --repro --out params.yaml`)."""
    text = (ROOT / "params.yaml").read_text()
    assert text == params_mod.dump_repro()
    got = params_mod.from_dict(yaml.safe_load(text)).to_dict()
    want = params_mod.defaults().to_dict()
    assert got["export"].pop("allow_stand_ins") is True and want["export"].pop("allow_stand_ins") is False
    assert got == want
    assert "# make repro only" in text


def test_partial_params_inherit_defaults():
    p = params_mod.from_dict({"seed": 7, "shard": {"max_count": 5}})
    assert p.seed == 7 and p.shard.max_count == 5
    assert p.shard.max_bytes == params_mod.defaults().shard.max_bytes
    assert p.data_dir == "data"


@pytest.mark.parametrize("data,needle", [
    ({"sed": 1}, "unknown key 'sed'"),
    ({"shard": {"max_cnt": 3}}, "params.shard: unknown key 'max_cnt'; allowed keys: max_bytes, max_count"),
    ({"executor": {"backend": "spark"}}, "'spark' is not allowed; allowed values: 'ray', 'local'"),
    ({"seed": "zero"}, "params.seed: expected an integer"),
    ({"synthesize": {"generators": {"warp": {}}}}, "unknown generator 'warp'; valid generators:"),
])
def test_bad_params_are_rejected_by_name(data, needle):
    with pytest.raises(ParamsError, match=needle.replace("(", r"\(")):
        params_mod.from_dict(data)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_help_everywhere():
    out = _cli("--help")
    assert out.returncode == 0
    for stage in stage_names() + ("run", "inspect"):
        assert stage in out.stdout
        sub = _cli(stage, "--help")
        assert sub.returncode == 0, stage
        assert "usage:" in sub.stdout


def test_cli_rejects_bad_params_file_and_manifest(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("data_dir: x\ningest: {max_pixel: 3}\n")
    out = _cli("ingest", "--params", str(bad))
    assert out.returncode == 2 and "unknown key 'max_pixel'" in out.stderr
    man = tmp_path / "m.yaml"
    man.write_text("sources:\n  - {name: a, kind: image_folder, path: ., labl: real}\n")
    p = tmp_path / "p2.yaml"
    p.write_text(f"data_dir: {tmp_path}/d\ncorpus: [{man}]\n")
    out = _cli("run", "--params", str(p))
    assert out.returncode == 2 and "unknown key 'labl'" in out.stderr and "allowed keys" in out.stderr
    out = _cli("dedup", "--params", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "not found" in out.stderr
