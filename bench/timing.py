"""Timing and machine-load helpers every section uses, the PyTorch side included (so no MindSpore here)."""

import contextlib
import io
import os
import statistics
import time
from pathlib import Path


def timed(fn):
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def interleaved(variants, repeats, warmup=1):
    """name -> timed runs: every repeat runs every variant once, in the given order; warm-up runs are dropped."""
    runs = {name: [] for name in variants}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            dt = timed(lambda: fn(r))
            if r >= warmup:
                runs[name].append(dt)
    return runs


def summary(runs):
    return {name: {"median_s": statistics.median(v), "runs_s": v} for name, v in runs.items()}


def paired_ratio(a, b):
    """Median of a_i / b_i over repeats, each pair measured back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def _meminfo_gb(path, key):
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 2**20
    return float("nan")


def mem_available_gb():
    """Memory this process could reach: what the machine has available plus what the process already holds."""
    return _meminfo_gb("/proc/meminfo", "MemAvailable:") + _meminfo_gb("/proc/self/status", "VmRSS:")


def peak_rss_mb():
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss is no use here: Linux carries the high-water mark
    of the image a process was exec'ed from, so a child of the large bench process would report the parent's peak."""
    return _meminfo_gb("/proc/self/status", "VmHWM:") * 1024


def current_rss_mb():
    return _meminfo_gb("/proc/self/status", "VmRSS:") * 1024


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')} load {loadavg()[0]:.1f}] {msg}", flush=True)


@contextlib.contextmanager
def quiet():
    """Silence the stages' own progress output (config dumps, tqdm bars) while they are being timed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
