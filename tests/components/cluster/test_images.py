"""`make images` (components/cluster/images.py) without Docker: it must not pass for built when nothing was,
and `--dry-run` must show the exact refs conf/cluster gives the images."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.cluster import images
from components.cluster.render import REPO


@pytest.fixture
def no_docker(monkeypatch, tmp_path) -> None:
    """A PATH with no `docker` on it, whatever this machine has installed."""
    monkeypatch.setenv("PATH", str(tmp_path))


def _built(out: str) -> dict[str, str]:
    """image name -> tag of each `+ docker ... build` line printed."""
    refs = {}
    for line in out.splitlines():
        argv = shlex.split(line.removeprefix("+ "))
        if line.startswith("+ ") and "build" in argv:
            refs[argv[argv.index("-f") + 1].split("/")[-2]] = argv[argv.index("-t") + 1]
    return refs


def test_without_an_engine_it_exits_3_and_names_what_was_not_built(cfg, no_docker, capsys) -> None:
    assert images.main([]) == images.NO_ENGINE == 3
    out, err = capsys.readouterr()
    assert out == ""  # not one build command was run
    assert "cannot build: no `docker` command on PATH" in err and "Nothing was built" in err
    for which in images.IMAGES:
        assert f"  {cfg.cluster.images.ref(which)}" in err.splitlines()


def test_dry_run_prints_the_build_commands_with_conf_tags(cfg, no_docker, capsys) -> None:
    assert images.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _built(out) == {w: cfg.cluster.images.ref(w) for w in images.IMAGES}
    for line in out.splitlines():
        argv = shlex.split(line.removeprefix("+ "))
        assert argv[-1] == str(REPO) and str(REPO / "images") in argv[argv.index("-f") + 1]


def test_dry_run_follows_overrides_and_only(no_docker, capsys) -> None:
    assert images.main(["--dry-run", "--push", "--only", "gpu", "cluster.images.tag=0.2.0",
                        "cluster.images.registry=registry.example.com/ml"]) == 0
    out = capsys.readouterr().out
    assert _built(out) == {"gpu": "registry.example.com/ml/omni-train-gpu:0.2.0"}
    assert "--push" in out.split()


def test_unknown_image_is_refused(no_docker) -> None:
    with pytest.raises(SystemExit) as exit_info:
        images.main(["--dry-run", "--only", "cpu,tpu"])
    assert exit_info.value.code == 2


def _dockerfile_pins(path) -> tuple[str, set[str], set[str]]:
    """(uv image tag, Pythons `uv python install`/`--python` ask for, Pythons of the python:* base images)."""
    text = path.read_text()
    uv_pin = re.search(r"^FROM ghcr\.io/astral-sh/uv:(\S+)", text, re.M)
    asked = set(re.findall(r"uv (?:python install|venv [^\n]*--python) (\d+\.\d+\.\d+)", text))
    asked |= set(re.findall(r"--python (\d+\.\d+\.\d+)", text))
    bases = set(re.findall(r"^FROM python:(\d+\.\d+\.\d+)-", text, re.M))
    return (uv_pin.group(1) if uv_pin else ""), asked, bases


def _uv_downloads() -> tuple[str, set[str]]:
    """The installed uv's version and the CPython builds it can download, from its own embedded list
    (`uv python list --only-downloads`: no network)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is a test dependency (pyproject [test]): reinstall with `pip install -e '.[test]'`"
    version = subprocess.run([uv, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    listing = subprocess.run(
        [uv, "python", "list", "--all-versions", "--only-downloads", "--all-platforms", "--output-format", "json"],
        capture_output=True, text=True, check=True, env={**os.environ, "UV_OFFLINE": "1", "UV_NO_CONFIG": "1"},
    )
    return version, {d["key"] for d in json.loads(listing.stdout)}


def test_gpu_image_uv_release_can_install_the_python_it_asks_for() -> None:
    """The flash-attention stage asks the pinned uv for a standalone CPython: that uv release must
    ship it (uv 0.8.17 stops at 3.11.13, so `uv python install 3.11.14` failed the build)."""
    uv_tag, asked, bases = _dockerfile_pins(REPO / "images" / "gpu" / "Dockerfile")
    version, downloads = _uv_downloads()
    assert version == uv_tag, (f"images/gpu/Dockerfile pins uv {uv_tag} but the test has uv {version}: "
                               "pin the same release in pyproject [test] and constraints.txt")
    assert asked, "the GPU Dockerfile no longer asks uv for a Python: update this test"
    for python in asked:
        assert f"cpython-{python}-linux-x86_64-gnu" in downloads, f"uv {uv_tag} cannot download CPython {python}"
    # The wheel built with uv's Python is installed into the python:* runtime: same interpreter.
    assert asked == bases, f"build Python {sorted(asked)} differs from the runtime base image's {sorted(bases)}"


def test_all_images_share_one_python() -> None:
    bases = {p.parent.name: _dockerfile_pins(p)[2] for p in sorted((REPO / "images").glob("*/Dockerfile"))}
    assert len(set().union(*bases.values())) == 1, bases
