"""Runs the Triton interpreter tests (``interpreter/``) in a child pytest process started with
TRITON_INTERPRET=1, unless this process can run them itself (see conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from kernel_helpers import interpreter_ready

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (Linux only)")
@pytest.mark.skipif(interpreter_ready(), reason="the interpreter tests run in this process")
def test_interpreter_suite_in_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not gpu", "-p", "no:cacheprovider",
                           os.path.join(HERE, "interpreter")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
