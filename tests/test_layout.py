"""The package layout's rules, checked on the source: arrows point down, `model/` knows nothing of
KFP, KServe or MLflow, and the light pipeline steps do not pay for torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# model/'s rooms, lowest first: a module may import its own room and the rooms below it.
ROOMS = [("model.config",), ("model.runtime", "model.storage"), ("model.media",), ("model.text",), ("model.nn",),
         ("model.data",), ("model.training", "model.eval", "model.export")]
RANK = {room: level for level, rooms in enumerate(ROOMS) for room in rooms}
FOREIGN = ("kfp", "kserve", "mlflow", "components", "pipelines", "serving")


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "model":  # from model import runtime
            found += [f"model.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _model_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted((REPO / "model").rglob("*.py")):
        if "templates" in path.parts:  # the Triton entry model runs inside Triton, not as part of the package
            continue
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        if module != "model":
            out.append((module, path))
    return out


@pytest.mark.parametrize("module,path", _model_modules(), ids=lambda x: x if isinstance(x, str) else "")
def test_model_imports_point_down_and_never_outward(module, path):
    room = _room(module)
    assert room in RANK, f"{module}: not in a known room; add it to ROOMS"
    for imported in _imports(path):
        top = imported.split(".")[0]
        assert top not in FOREIGN, f"{module} imports {imported}: model/ never imports {', '.join(FOREIGN)}"
        if top == "model" and imported != "model":
            target = _room(imported)
            assert RANK[target] < RANK[room] or target == room, (
                f"{module} ({room}) imports {imported} ({target}): arrows point down only")


def _loads(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    return set(out)


def test_light_steps_do_not_import_torch():
    loaded = _loads("import components.pipeline_components, components.steps.lifecycle, components.registry.gate")
    assert "torch" not in loaded and "transformers" not in loaded


def test_data_prep_does_not_import_the_network_or_deepspeed():
    # Prep tokenises (a transformers tokenizer, which loads torch), but never builds the model.
    loaded = _loads("import model.data.prep")
    assert not {"model.nn.omni", "deepspeed", "model.training"} & {m for m in loaded if "." in m or m == "deepspeed"}


# serving/: the protocols (serving/protocol/) parse requests into the predictor's neutral types and
# format its answers; the predictor and the modules below it never know which protocol asked. Only
# the server, which wires them together, imports both; nothing in serving/ imports the server.
def _serving_modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(REPO).with_suffix("").parts), p) for p in sorted((REPO / "serving").rglob("*.py"))]


def _serving_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    extra = [f"serving.{a.name}" for node in ast.walk(tree)  # from serving import protocol
             if isinstance(node, ast.ImportFrom) and node.module == "serving" for a in node.names]
    return _imports(path) + extra


@pytest.mark.parametrize("module,path", _serving_modules(), ids=lambda x: x if isinstance(x, str) else "")
def test_serving_arrows_run_from_the_protocols_to_the_predictor(module, path):
    for imported in _serving_imports(path):
        assert not imported.startswith("serving.server"), f"{module} imports {imported}: nothing imports the server"
        if not module.startswith(("serving.protocol", "serving.server")):
            assert not imported.startswith("serving.protocol"), (
                f"{module} imports {imported}: only the protocols and the server know a protocol")


def test_the_predictor_is_among_the_checked_serving_modules():
    assert "serving.predictor" in dict(_serving_modules())


def _package_modules(*tops: str) -> list[tuple[str, Path]]:
    out = []
    for top in tops:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            out.append((".".join(p for p in rel.parts if p != "__init__"), path))
    return out


def _top_imports(path: Path) -> set[str]:
    return {imported.split(".")[0] for imported in _imports(path)}


# Who may import a library directly (modules or module prefixes): each outside world has one room.
OWNERS = {
    "mlflow": ("components.registry.",),
    "kfp": ("components.pipeline_components", "pipelines."),
    "kubernetes": ("components.cluster.",),
}


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_outside_library_is_imported_by_its_room_alone(library):
    owners = OWNERS[library]
    trespassers = [module for module, path in _package_modules("components", "pipelines", "serving", "model")
                   if library in _top_imports(path) and not module.startswith(owners)]
    assert not trespassers, f"{trespassers} import {library}: only {', '.join(owners)} may"


# components/'s rooms and the rooms each may import (besides itself, the root config and the stage
# registry): the registry, cluster and report rooms are libraries the steps use, never the reverse,
# and nothing in components/ knows the pipelines package above it.
COMPONENT_ROOMS = {
    "components.registry": set(),
    "components.reports": set(),
    "components.cluster": set(),
    "components.steps": {"components.registry", "components.reports", "components.cluster"},
}
BASE = {"components.config", "components.stages"}


def _component_room(module: str) -> str:
    return ".".join(module.split(".")[:2])


@pytest.mark.parametrize("module,path", _package_modules("components"), ids=lambda x: x if isinstance(x, str) else "")
def test_components_rooms_import_only_what_they_stand_on(module, path):
    room = _component_room(module)
    for imported in _imports(path):
        assert not imported.startswith("pipelines"), f"{module} imports {imported}: components/ never knows pipelines/"
        target = _component_room(imported)
        if room in COMPONENT_ROOMS and imported.startswith("components.") and target not in BASE | {room}:
            assert target in COMPONENT_ROOMS[room], (
                f"{module} ({room}) imports {imported}: {room} may import {sorted(COMPONENT_ROOMS[room] | BASE)}")


def test_the_stage_list_is_written_once():
    """Only the registry spells the stages out; KFP's signatures (which must) are checked against it
    in tests/components/test_stages.py."""
    spelled = [module for module, path in _package_modules("components", "pipelines")
               if "\"omni_align\"" in path.read_text() and module not in ("components.stages",
                                                                          "components.pipeline_components")]
    assert not spelled, f"{spelled} spell out a stage name; read components.stages instead"
