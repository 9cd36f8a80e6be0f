"""pyproject's lower bounds are true: the ranged dependencies resolve at exactly their declared floors
(a floor that cannot be installed with the others is not one), and unit tests that exercise them pass
on those versions (tests/floors.py: a venv layered over the project's, cached in .cache). About 15 s
with that venv cached; building it (uv, wheels from PyPI or uv's cache) took under a minute more.
`make test-floors` runs a wider set of tests the same way."""

from __future__ import annotations

from packaging.version import Version

from tests import floors


def test_the_declared_floors_install_and_pass_the_unit_tests():
    reqs = floors.ranged_requirements()
    assert {r.name for r in reqs} >= {"transformers", "tokenizers", "numpy", "pydantic"}
    python = floors.overlay_python(reqs)
    installed = floors.installed_versions(python, [r.name for r in reqs])
    wrong = {r.name: (floors.floor(r), installed[r.name]) for r in reqs
             if Version(installed[r.name]) != Version(floors.floor(r))}
    assert not wrong, f"declared floor vs what resolves at the lowest allowed versions: {wrong}; raise the floor"
    proc = floors.run_tests(python, floors.QUICK_TESTS)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
