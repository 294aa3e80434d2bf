"""Packaging without building anything: the declared ranges (pyproject.toml) hold the tested pins
(requirements.txt), the package finds no file through its own source location, and the Delta jars come
from the config, $LAKELENS_JARS_DIR, a checkout's build/jars, else Maven coordinates, in that order.
tests/integration/test_wheel.py installs the wheel itself."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version

import pytest
import tomllib
from conftest import ROOT
from packaging.requirements import Requirement

from lakelens import jvm, spark
from lakelens.errors import ConfigError


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def test_the_declared_ranges_hold_the_tested_pins_and_the_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[_name(req.name)] = next(iter(req.specifier)).version
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in declared:
        if _name(req.name) != "lakelens":  # dev names the other extras
            assert _name(req.name) in pins, f"{req.name} is declared but has no tested pin in requirements.txt"
            assert req.specifier.contains(pins[_name(req.name)]), f"{req} excludes the tested {pins[_name(req.name)]}"
    assert project["dynamic"] == ["version"] and "version" not in project  # lakelens.__version__ alone
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "lakelens.__version__"}


def test_no_module_finds_files_through_its_source_location():
    lib = ROOT / "lib" / "lakelens"
    offenders = [f"{p.relative_to(lib)}:{n}" for p in lib.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"(?<![\w.])__file__", line)]  # another package's module.__file__ is fine
    assert offenders == []


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Three jar folders (conf, env, a checkout's build/jars) and a folder outside any checkout."""
    for folder in ("conf-jars", "env-jars", "checkout/build/jars"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "delta-spark_4.2_2.13-4.4.0.jar").write_bytes(b"")
    (tmp_path / "checkout" / "pyproject.toml").write_text('[project]\nname = "lakelens"\n')
    (tmp_path / "checkout" / "sub").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.delenv("LAKELENS_JARS_DIR", raising=False)
    monkeypatch.setenv("LAKELENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))  # not this checkout's venv
    return tmp_path


def test_jars_come_from_the_conf_then_the_environment_then_a_checkout_then_maven(places, monkeypatch):
    monkeypatch.chdir(places / "checkout" / "sub")  # a checkout is found from the current folder upward
    assert spark.checkout_root() == places / "checkout"
    monkeypatch.setenv("LAKELENS_JARS_DIR", str(places / "env-jars"))
    assert spark.find_jars(str(places / "conf-jars")) == [str(places / "conf-jars" / "delta-spark_4.2_2.13-4.4.0.jar")]
    assert spark.jars_folder() == str(places / "env-jars")
    with pytest.raises(ConfigError, match="spark.jars_dir: no delta-spark jar in"):
        spark.find_jars(str(places / "elsewhere"))
    monkeypatch.delenv("LAKELENS_JARS_DIR")
    assert spark.jars_folder() == str(places / "checkout" / "build" / "jars")
    assert jvm.cds_dir() == places / "checkout" / "build" / "cds"  # the class archive beside the jars

    monkeypatch.chdir(places / "elsewhere")  # an installed wheel used outside any checkout
    assert spark.checkout_root() is None and spark.find_jars() == []
    import pyspark

    release = ".".join(pyspark.__version__.split(".")[:2])
    assert spark.DELTA_PACKAGE == f"io.delta:delta-spark_{release}_2.13:{version('delta-spark')}"
    assert spark.submit_jars_arg() == ["--packages", spark.DELTA_PACKAGE]
    assert jvm.cds_dir() == places / "cache" / "cds"


def test_a_command_missing_an_optional_part_names_the_extra_that_installs_it(tmp_path, monkeypatch, capsys):
    from lakelens.cli import main

    for name in [m for m in sys.modules if m.startswith("lakelens.web")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flask", None)  # as if the web extra were not installed
    assert main(["serve", "--index", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "lakelens serve: error: needs flask, which a plain install leaves out: pip install 'lakelens[web]'\n"
