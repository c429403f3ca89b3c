"""Shared expensive fixtures: one tiny data directory and the deepspeed runs every test reads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ds_launch import TINY, launch, run


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("data"))
    proc = run([sys.executable, "-m", "data_pipeline.prepare", "--config", "configs/demo.yaml", *TINY,
                f"data.data_dir={data_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data_dir


class Runs:
    """Launches cached per key, so several tests read one run."""

    def __init__(self, base, data_dir):
        self.base, self.data_dir, self.cache = base, data_dir, {}

    def get(self, key: str, *overrides: str, run_dir: str | None = None) -> tuple[str, subprocess.CompletedProcess]:
        if key not in self.cache:
            rd = run_dir or str(self.base / key)
            self.cache[key] = (rd, launch(rd, self.data_dir, *overrides))
        return self.cache[key]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_data) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), tiny_data)
