"""A real Triton Inference Server for an exported model repository, on this machine's CPU.

    python -m serving.triton REPO [--venv .cache/triton-venv] [--http-port 8000] [--grpc-port 8001]

The server is the `tritonserver` binary (2.51) bundled in `nvidia-pytriton`, run directly: the
Python backend only (no onnxruntime/pytorch backends), so the repository must be exported with
`encoder_backend="python"` (`model.export.triton`). The models run as Python-backend processes in
their own venv, because Triton 2.51's backend stub breaks every output with numpy 2: that venv
holds numpy<2 and nvidia-pytriton and reads everything else (torch, transformers, onnxruntime,
PIL, PyAV) from this interpreter's site-packages, after its own. Every address is 127.0.0.1.

On a GPU cluster the repository is served by NVIDIA's Triton image instead (onnxruntime backend,
`encoder_backend="onnxruntime"`), which this module does not start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from serving.local import free_port, stop_process, wait_ready

PYTRITON = "nvidia-pytriton==0.7.0"
MODELS_NUMPY = "numpy<2"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def ensure_models_venv(venv: str | Path) -> Path:
    """Create the models' venv once (numpy<2 + nvidia-pytriton from the package index; ~250 MB)."""
    venv = Path(venv)
    marker = venv / ".omni-ready"
    if marker.is_file():
        return venv
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", MODELS_NUMPY, PYTRITON], check=True)
    # A plain path line: this interpreter's packages come after the venv's own (its numpy<2 wins),
    # and that directory's own .pth files (editable installs) are not run.
    (_site_packages(venv) / "omni-base-site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    marker.touch()
    return venv


def _backend_dir(venv: Path, dst: Path) -> Path:
    """--backend-directory: python/ with the backend library, its utils and the stub for this Python."""
    bundled = _site_packages(venv) / "pytriton" / "tritonserver"
    python = dst / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link = python / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(bundled / "backends" / "python" / name)
    stub = bundled / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(stub / "triton_python_backend_stub", python / "triton_python_backend_stub")
    return dst


@dataclass
class TritonServer:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, timeout)


def start_tritonserver(repo: str | Path, venv: str | Path, workdir: str | Path, threads: int = 1,
                       ports: tuple[int, int, int] | None = None, ready_s: float = 180) -> TritonServer:
    """Start tritonserver on `repo` with the models' `venv` and wait until every model is ready."""
    venv, workdir, repo = ensure_models_venv(venv).resolve(), Path(workdir).resolve(), Path(repo).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    site = _site_packages(venv)
    http, grpc, metrics = ports or (free_port(), free_port(), free_port())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", OMP_NUM_THREADS=str(threads),
               LD_LIBRARY_PATH=f"{site / 'nvidia_pytriton.libs'}:{sysconfig.get_config_var('LIBDIR')}")
    cmd = [str(site / "pytriton" / "tritonserver" / "bin" / "tritonserver"), f"--model-repository={repo}",
           f"--backend-directory={_backend_dir(venv, workdir / 'backends')}",
           "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
           "--metrics-address=127.0.0.1", f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
           "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=5"]
    log_path = workdir / "tritonserver.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    server = TritonServer(proc, http, grpc, metrics, log_path)
    wait_ready(proc, f"http://{server.http_url}/v2/health/ready", ready_s, server.log, "tritonserver")
    return server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serving.triton", description=__doc__.split("\n\n")[0])
    p.add_argument("repo", type=Path, help="model repository written with encoder_backend='python'")
    p.add_argument("--venv", type=Path, default=Path(".cache/triton-venv"), help="the models' venv (created once)")
    p.add_argument("--workdir", type=Path, default=Path(".cache/triton-run"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    args = p.parse_args(argv)
    server = start_tritonserver(args.repo, args.venv, args.workdir,
                                ports=(args.http_port, args.grpc_port, args.metrics_port))
    print(f"tritonserver ready: http {server.http_url}, grpc {server.grpc_url} (log {server.log_path})", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
