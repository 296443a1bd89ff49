"""Facts about the machine m4 runs on: what benchmark and calibration records were measured
on, and which GPU TensorRT engines are built for. Standard library only (torch is asked,
where installed, only for its version and CUDA device)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

# where TensorRT's Python API comes from
TENSORRT_INSTALL = "on Jetson it comes with JetPack 6, elsewhere pip install tensorrt"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"], info["cuda"] = torch.cuda.get_device_name(), torch.version.cuda
    except ImportError:
        pass
    return info


@functools.cache  # one GPU per process; nvidia-smi is a subprocess, asked once
def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    jetson = Path("/proc/device-tree/model")  # Jetson has no nvidia-smi
    return jetson.read_text().strip("\x00\n ") if jetson.is_file() else "unknown"
