"""Where a run came from: the code (git commit, dirty tree), the packages, the resolved config,
seed, device, precision, process count and start time. `dlm train` appends one entry per
invocation to run_dir/provenance.json; `dlm report` copies it into report.json."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from dlm.core.data import atomic_write_bytes

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def git_state(where: str | Path = PACKAGE_DIR) -> dict[str, Any]:
    """The commit of the git checkout holding `where` (dlm's own source by default) and whether
    its tree has uncommitted changes; both None outside a checkout or where git is absent."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git binary, or it hangs
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit.strip(), "git_dirty": None if status is None else bool(status.strip())}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("dlm", "torch", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch  # the running one wins over whatever metadata says

    versions["torch"] = torch.__version__
    return versions


def environment() -> dict[str, Any]:
    """What does not depend on the run: code, packages, Python, the machine, the time now (UTC)."""
    return {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **git_state(), "versions": package_versions(), "python": sys.version.split()[0], "machine": machine()}


@functools.cache
def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU a time was measured on: its model, cores, and the instruction sets that decide the
    speed of a step (bf16 and AMX units, AVX-512, AVX2); times compare only on like machines."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux: the model from platform alone
        pass
    wanted = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [flag for flag in wanted if flag in flags]}


def invocation(config: dict, *, mode: str, step: int, device: str, precision: str, processes: int = 1,
               corpus: dict | None = None, start: dict | None = None) -> dict:
    """One `dlm train` (or train.ipynb) invocation: the environment plus the resolved run settings
    and the corpus it read (its path and SHA-256). `mode` is fresh, restarted (a folder without a
    checkpoint started again), resume, or cooldown (dlm cooldown: `start` names the other run's
    checkpoint, its step and the config keys changed)."""
    entry = {**environment(), "mode": mode, "from_step": step, "argv": list(sys.argv),
             "seed": config.get("seed"), "device": device, "precision": precision, "processes": processes,
             "corpus": corpus, "config": config}
    return {**entry, "start": start} if start else entry


def read_provenance(path: str | Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    return data.get("invocations", []) if isinstance(data, dict) else []


def record_invocation(path: str | Path, entry: dict, keep_earlier: bool) -> None:
    """Append `entry` to provenance.json (atomically), or start the list with it."""
    earlier = read_provenance(path) if keep_earlier else []
    payload = {"invocations": [*earlier, entry]}
    atomic_write_bytes(Path(path), json.dumps(payload, indent=2, default=str).encode())
