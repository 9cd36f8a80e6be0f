"""Build (and optionally push) the platform's images with the tags conf/cluster gives them
(`make images`): the same refs the compiled pipeline, the chart and the TrainJobs use.

    python -m components.cluster.images [--push] [--dry-run] [--only cpu,gpu,serving] [overrides]

Without a Docker engine this says so and exits with status 3: a build step that built nothing
must not look like a success to the CI job that pushes or deploys next. `--dry-run` prints the
commands and exits 0 anywhere.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from components.cluster.render import REPO

IMAGES = ("cpu", "gpu", "serving")
NO_ENGINE = 3


def build_commands(refs: dict[str, str], push: bool, buildx: bool) -> list[list[str]]:
    cmds = []
    for which, ref in refs.items():
        dockerfile = str(REPO / "images" / which / "Dockerfile")
        if buildx:
            cmds.append(["docker", "buildx", "build", "--platform", "linux/amd64", "-f", dockerfile, "-t", ref,
                         "--push" if push else "--load", str(REPO)])
        else:
            cmds.append(["docker", "build", "-f", dockerfile, "-t", ref, str(REPO)])
            if push:
                cmds.append(["docker", "push", ref])
    return cmds


def engine() -> tuple[bool, bool, str]:
    """(engine reachable, buildx available, why not)."""
    if shutil.which("docker") is None:
        return False, False, "no `docker` command on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return (
            False,
            False,
            f"the docker command cannot reach an engine ({info.stderr.strip() or 'docker info failed'})",
        )
    buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0
    return True, buildx, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.cluster.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--push", action="store_true", help="push after building (log in to the registry first)")
    parser.add_argument("--dry-run", action="store_true", help="print the build commands only")
    parser.add_argument("--only", default=",".join(IMAGES), help="comma-separated subset of cpu,gpu,serving")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. cluster.images.tag=0.2.0")
    args = parser.parse_args(argv)
    from components.config import load_config

    images = load_config(args.overrides).cluster.images
    wanted = [w for w in args.only.split(",") if w]
    if unknown := set(wanted) - set(IMAGES):
        parser.error(f"--only: unknown image(s) {sorted(unknown)}; choose from {', '.join(IMAGES)}")
    refs = {w: images.ref(w) for w in wanted}
    reachable, buildx, why = (True, True, "") if args.dry_run else engine()
    if not reachable:
        print(
            f"make images: cannot build: {why}.\nNothing was built. On a machine with Docker (or in CI with "
            "docker/setup-buildx-action) run `make images` again; these refs would be built:",
            file=sys.stderr,
        )
        for ref in refs.values():
            print(f"  {ref}", file=sys.stderr)
        return NO_ENGINE
    for cmd in build_commands(refs, args.push, buildx):
        print("+ " + " ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
