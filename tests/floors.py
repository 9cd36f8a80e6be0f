"""The declared lower bounds of pyproject's dependencies, installed and tested.

A range such as `transformers>=5.0` promises that the code runs on 5.0. Here the ranged dependencies
are resolved with uv at their lowest allowed versions (`--resolution lowest-direct`) into a venv
layered over the project's own (its site-packages first, the project venv's after it, so torch,
DeepSpeed and the rest come from there), and unit tests run on that interpreter. The venv is kept in
.cache, keyed by the ranges, so a second run only runs the tests.

    python -m tests.floors [pytest args]   # `make test-floors`: the wider set of unit tests
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# What the floors test runs by default: the code that uses the ranged packages most (transformers'
# models and checkpointing, tokenizers, safetensors, pydantic configs), in about 15 s.
QUICK_TESTS = ["tests/model/nn/test_loss.py", "tests/model/nn/test_omni_model.py", "tests/model/nn/test_compose.py",
               "tests/model/text/test_processor.py",
               "tests/model/nn/test_engine.py::test_greedy_answers_in_a_batch_equal_each_alone",
               "tests/model/training/test_recipe.py::test_activation_checkpointing_saves_less_and_keeps_gradients"]
WIDE_TESTS = ["tests/model/nn", "tests/model/text", "tests/model/training/test_recipe.py",
              "tests/model/data/test_packing.py"]


def ranged_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """The runtime dependencies with a lower bound that is not also an exact pin."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return [r for r in reqs if any(s.operator == ">=" for s in r.specifier)
            and not any(s.operator == "==" for s in r.specifier)]


def floor(req: Requirement) -> str:
    return next(s.version for s in req.specifier if s.operator == ">=")


def overlay_python(reqs: list[Requirement], root: Path = REPO / ".cache") -> Path:
    """The interpreter of a venv holding `reqs` at their lowest allowed versions, layered over this
    one's site-packages (built on first use; rebuilt when the ranges change)."""
    key = hashlib.sha256(json.dumps(sorted(map(str, reqs))).encode()).hexdigest()[:12]
    venv = root / f"floors-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".ready").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([str(uv), "pip", "install", "-q", "--python", str(python), "--resolution", "lowest-direct",
                    *map(str, reqs)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # A .pth line starting with `import` runs at start-up: addsitedir also reads the project venv's
    # own .pth files (the editable install among them), which a plain path line would not.
    (Path(site) / "zz_project_venv.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    (venv / ".ready").touch()
    return python


def installed_versions(python: Path, names: list[str]) -> dict[str, str]:
    code = ("import json, sys; from importlib.metadata import version; "
            "print(json.dumps({n: version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *names], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_tests(python: Path, tests: list[str], extra: list[str] = ()) -> subprocess.CompletedProcess:
    # The project venv's programs (the tests' `weed` S3 server) stay on PATH, after the overlay's.
    path = os.pathsep.join([str(python.parent), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": path}
    return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *tests, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True)


def main() -> None:
    reqs = ranged_requirements()
    python = overlay_python(reqs)
    print("floors:", installed_versions(python, [r.name for r in reqs]))
    proc = run_tests(python, WIDE_TESTS, sys.argv[1:])
    print(proc.stdout[-5000:], proc.stderr[-3000:])
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
