"""The interpreter tests run only where triton was imported with TRITON_INTERPRET=1 (see ../conftest.py)."""

from __future__ import annotations

import os

from kernel_helpers import interpreter_ready

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    """Deselect these tests when this process cannot interpret (the child process runs them)."""
    if interpreter_ready():
        return
    ours = [item for item in items if str(item.fspath).startswith(HERE)]
    if ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if not str(item.fspath).startswith(HERE)]
