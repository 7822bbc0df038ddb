"""The stage list is the one place a stage is registered: CLI, params sections, `run` and
dvc.yaml all follow it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from pipeline import params as params_mod
from pipeline import stages
from pipeline.cli import DataDirBusy, DataDirLock, build_parser
from pipeline.params import ParamsError
from pipeline.stage import CORPUS, Stage, artifact_paths


def test_checked_in_dvc_yaml_is_derived_from_the_declarations():
    params = params_mod.load(ROOT / "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == stages.dvc_yaml(params), (
        "dvc.yaml disagrees with the stage declarations; regenerate it with "
        "`python -m pipeline dvc-yaml --out dvc.yaml`"
    )


def test_dvc_stages_follow_each_declaration():
    dvc = yaml.safe_load(stages.dvc_yaml(params_mod.defaults()))["stages"]
    paths = stages.artifacts()
    assert list(dvc) == list(stages.names())
    for s in stages.all_stages():
        entry = dvc[s.name]
        assert entry["cmd"] == f"python -m pipeline {s.name} --params params.yaml"
        for name in s.reads:
            assert ("manifests" if name == CORPUS else f"data/{paths[name]}") in entry["deps"]
        assert s.module.replace(".", "/") + ".py" in entry["deps"]
        assert [o for o in entry["outs"] if isinstance(o, str)] == [
            f"data/{rel}" for rel in s.writes.values()
        ]
        assert s.name in entry["params"] and set(s.uses) <= set(entry["params"])
        assert entry["metrics"] == [{f"metrics/{s.name}.json": {"cache": False}}]


def test_every_stage_is_a_cli_command_and_a_params_section():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    defaults = params_mod.defaults()
    for s in stages.all_stages():
        assert s.name in commands
        assert dataclasses.is_dataclass(s.params)
        assert isinstance(getattr(defaults, s.name), s.params)
        assert s.name in defaults.to_dict()


def test_reads_must_be_written_by_an_earlier_stage():
    def run(*a):
        return {}

    a = Stage("a", "", object, run, reads=(CORPUS,), writes={"x": "x"})
    b = Stage("b", "", object, run, reads=("x",), writes={"y": "y"})
    assert artifact_paths([a, b]) == {"x": "x", "y": "y"}
    with pytest.raises(ValueError, match="reads 'x', which no earlier stage writes"):
        artifact_paths([b, a])
    with pytest.raises(ValueError, match="written by two stages"):
        artifact_paths([a, Stage("c", "", object, run, reads=(), writes={"x": "z"})])


def test_inputs_are_resolved_by_artifact_name(tmp_path):
    p = params_mod.from_dict({"data_dir": str(tmp_path)})
    inputs, out = stages.resolve(stages.get("masks"), p)
    assert inputs["synthesize"] == tmp_path / "synthesize"
    assert inputs["ingest"] == tmp_path / "ingest"
    assert inputs["manifest"] == tmp_path / "synthesize" / "manifest.parquet"
    assert out == tmp_path / "masks"
    inputs, _ = stages.resolve(stages.get("export"), p)
    assert inputs["manifest"] == tmp_path / "manifest.parquet"


def test_nested_mappings_merge_with_defaults_and_null_removes_an_entry():
    d = params_mod.defaults()
    p = params_mod.from_dict({
        "synthesize": {"generators": {"inpaint": {"batch_size": 4}}, "domain_weights": {"face": 2}},
        "export": {"exports": {"balanced": None, "mine": {"fractions": [1.0]}}},
    })
    gens = p.synthesize.generators
    assert set(gens) == set(d.synthesize.generators)  # the others are still there
    assert gens["inpaint"].batch_size == 4 and gens["inpaint"].weight == 1.0
    assert p.synthesize.domain_weights == {**d.synthesize.domain_weights, "face": 2.0}
    assert set(p.export.exports) == {"mine"}


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_numbers_are_rejected(value):
    with pytest.raises(ParamsError, match="finite"):
        params_mod.from_dict(yaml.safe_load(f"masks: {{max_area: {value}}}"))


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_params_command_prints_the_merged_params(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("seed: 3\nsynthesize: {generators: {inpaint: {weight: 0}}}\n")
    out = _cli("params", "--params", str(f))
    assert out.returncode == 0, out.stderr
    got = yaml.safe_load(out.stdout)
    assert got["seed"] == 3
    assert got["synthesize"]["generators"]["inpaint"]["weight"] == 0
    assert got["synthesize"]["generators"]["copy_move"]["weight"] == 1.0
    assert set(got) == set(params_mod.defaults().to_dict())
    f.write_text("synthesize: {generators: {inpaint: {wieght: 0}}}\n")
    out = _cli("params", "--params", str(f))
    assert out.returncode == 2 and "unknown key 'wieght'" in out.stderr


def test_data_dir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "d").write_text("x")
    f = tmp_path / "p.yaml"
    f.write_text(f"data_dir: {tmp_path / 'd'}\n")
    out = _cli("ingest", "--params", str(f))
    assert out.returncode == 2 and "data_dir must be a folder" in out.stderr


def test_a_second_run_on_a_busy_data_dir_fails_clearly(tmp_path):
    with DataDirLock(tmp_path):
        with pytest.raises(DataDirBusy, match=r"in use by pid \d+"):
            with DataDirLock(tmp_path):
                pass
        f = tmp_path / "p.yaml"
        f.write_text(f"data_dir: {tmp_path}\ncorpus: []\n")
        out = _cli("ingest", "--params", str(f))
        assert out.returncode == 2 and "in use by pid" in out.stderr
    with DataDirLock(tmp_path):  # released
        pass


def test_a_distribution_is_replaced_whole():
    p = params_mod.from_dict({"split": {"ratios": {"train": 1.0}}})
    assert p.split.ratios == {"train": 1.0}
