"""Helpers shared by the benchmarks: machine description, peak-RSS measurement, medians, JSON output.

Peak memory on CPU (what ``PeakRss`` measures): the growth of the process's resident set during one
call, read from the kernel. Before the call the peak counter (VmHWM) is reset by writing ``5`` to
``/proc/self/clear_refs``; after it, ``VmHWM - VmRSS(before)`` is the peak extra memory the call touched
(activations, saved tensors, gradients, workspaces), including memory held by C/C++ libraries that
tracemalloc or torch's CPU allocator statistics do not see. For that count to be exact, the block runs
with glibc's mmap threshold fixed at 64 KiB (every larger allocation is its own mmap, unmapped on free)
after ``malloc_trim(0)`` has given the free heap back; after the block the threshold goes to 32 MiB
(trim threshold 64 MiB), the value glibc's dynamic threshold settles at once a process has freed
large tensors. Timed calls therefore run under ordinary allocator behaviour: with the 64 KiB
threshold process-wide (how these scripts first ran) every temporary above 64 KiB page-faults
afresh on each use, which slowed SDPA at n=2048 from 318 to 464 ms and the bucketed BERT-LSH path
from 490 to 1103 ms -- a cost no training process pays.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters
_EXACT_MMAP, _STEADY_MMAP = 64 << 10, 32 << 20


def _libc():
    """glibc's malloc controls (None elsewhere: musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt, lib.malloc_trim  # noqa: B018 - both must exist
        return lib
    except (OSError, AttributeError):
        return None


def malloc_exact(exact: bool) -> None:
    """``exact=True``: give free heap memory back and mmap every allocation above 64 KiB (RSS then
    tracks live memory exactly); ``False``: glibc's steady-state thresholds (32 MiB mmap, 64 MiB trim)."""
    lib = _libc()
    if lib is None:
        return
    if exact:
        lib.malloc_trim(0)
        lib.mallopt(_M_MMAP_THRESHOLD, _EXACT_MMAP)
    else:
        lib.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP)
        lib.mallopt(_M_TRIM_THRESHOLD, 2 * _STEADY_MMAP)


def ensure_env() -> None:
    """Re-exec this script once with the benchmark environment (glibc's allocator thresholds are set
    at run time instead: see ``PeakRss``):

    - ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep instead of spinning between parallel regions.
      On this shared 2-core machine (load average 5-12 from other jobs) spinning threads that wait
      for a descheduled partner made every parallel region cost up to ~100 ms: ``index_add_`` of 2432
      rows took 104 ms with the default policy and 0.3 ms with PASSIVE, SDPA at n=2048 687 vs 286 ms.
      That distorts code made of many small ops (the blocked LSH / YOSO paths) far more than one
      fused kernel, so every benchmark runs with PASSIVE (recorded in the JSON's machine block).
    """
    want = {"OMP_WAIT_POLICY": "PASSIVE"}
    missing = {k: v for k, v in want.items() if k not in os.environ}
    if missing and sys.platform.startswith("linux") and not os.environ.get("BENCH_NO_REEXEC"):
        env = dict(os.environ, **missing)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if MMAP_ENV not in os.environ:
        malloc_exact(False)


ensure_mmap_threshold = ensure_env


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakRss:
    """``with PeakRss() as m: ...`` -> ``m.peak_bytes``: peak RSS growth during the block (Linux),
    counted with the exact allocator settings (module docstring), restored to steady ones after."""

    def __enter__(self) -> PeakRss:
        import gc

        gc.collect()
        malloc_exact(True)
        self.ok = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.ok = False
        self.before = _status_kb("VmRSS") * 1024 if os.path.exists("/proc/self/status") else 0
        return self

    def __exit__(self, *exc) -> None:
        if MMAP_ENV not in os.environ:  # a user's own fixed threshold stays as given
            malloc_exact(False)
        if not self.ok:
            self.peak_bytes = None
            return
        self.peak_bytes = max(0, _status_kb("VmHWM") * 1024 - self.before)


def available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no lscpu: the platform's name
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load average, torch version and threads (stated in every output)."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "mem_available_gb_start": round(available_bytes() / 2**30, 1),
        "cuda": torch.cuda.is_available(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc_mmap_threshold": os.environ.get(MMAP_ENV) or
        f"{_EXACT_MMAP} while peak memory is measured, {_STEADY_MMAP} while timed",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info["mem_total_gb"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    return info


def finish(payload: dict, out: str, tiny: bool, no_report: bool) -> None:
    """Write a benchmark's JSON to ``out`` and, for a full-size run, refresh BENCHMARKS.md."""
    payload["settings"]["tiny"] = tiny
    write_json(out, payload)
    log(f"wrote {out}")
    if not no_report and not tiny:
        from bench import report

        report.refresh()


def finish_machine(info: dict[str, Any]) -> dict[str, Any]:
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def write_json(path: str, payload: dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: T201
