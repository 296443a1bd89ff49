"""Facts about the machine m4 runs on: what benchmark and calibration records were measured
on, and which GPU TensorRT engines are built for. Standard library only (torch is asked,
where installed, only for its version and CUDA device)."""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from pathlib import Path

from m4.errors import M4Error

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


# M4_MEMORY_LIMIT: bytes m4 may assume are free, in place of the machine's MemAvailable
# (a number of bytes, or with a K, M, G or T suffix: 8G)
MEMORY_LIMIT = "M4_MEMORY_LIMIT"
SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines) if v.split()}


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have: M4_MEMORY_LIMIT where set, else the kernel's
    MemAvailable; None where neither is known."""
    limit = os.environ.get(MEMORY_LIMIT)
    if limit:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", limit.upper())
        if not m:
            raise M4Error(f"{MEMORY_LIMIT}={limit!r}: give bytes, or a number with K, M, G or T (8G)")
        return int(float(m[1]) * SUFFIXES[m[2]])
    return meminfo().get("MemAvailable")


def total_memory() -> int | None:
    return meminfo().get("MemTotal")


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
