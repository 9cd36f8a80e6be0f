"""`make images` (pipelines/images.py) without Docker: it must not pass for built when nothing was,
and `--dry-run` must show the exact refs conf/cluster gives the images."""

from __future__ import annotations

import shlex

import pytest

from pipelines import images
from pipelines.cluster import REPO


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
