"""What the results record about the machine and the code measured: CPU, versions, commit, CPU substitutes."""

import hashlib
import os
import platform
import subprocess
from pathlib import Path

from bench import ROOT


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_facts():
    import mindone
    import mindspore as ms

    from t2i.core import cpu_ops

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "mem_total_gb": round(os.sysconf("SC_PHYS_PAGES") *
                                                                   os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(), "mindspore": ms.__version__, "mindone": mindone.__version__,
        "device_target": ms.get_context("device_target"),
        "pynative_synchronize": ms.get_context("pynative_synchronize"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_modified": (git("status", "--porcelain", "--untracked-files=no") or "").splitlines(),
        "cpu_ops": cpu_ops_state(cpu_ops),
    }


def cpu_ops_state(cpu_ops):
    """Which CPU substitutes were active: the file's hash and last commit say which version of them was measured."""
    from mindone.diffusers.models.attention_processor import Attention
    from mindspore import mint

    path = Path(cpu_ops.__file__)
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return {
        "installed": cpu_ops._installed,
        "attention_fast_path": Attention.math_attention_op is cpu_ops.math_attention_op,
        "softmax_fast_path": mint.softmax is cpu_ops.softmax,
        "linear_fast_path": mint.nn.Linear is cpu_ops.Linear,
        "substitutes": sorted([*cpu_ops.MINT, *(f"nn.{k}" for k in cpu_ops.MINT_NN),
                               *(f"nn.functional.{k}" for k in cpu_ops.MINT_F)]),
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        "last_commit": git("log", "-1", "--format=%h %s", "--", str(rel)),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", str(rel))),
    }
