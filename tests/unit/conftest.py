"""Shared fixtures of the data-pipeline tests: one small prepared dataset per session.

The dataset is built from ``demo_stdlib`` (capped at 1 MB) with a 512-piece tokenizer and 64-token
sequences, in 250-sample shards so the last shard of each split is short (unequal shards).
"""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from launch.config import DataConfig, load_config

SEQ_LEN = 64
VOCAB = 512
PER_SHARD = 250


@pytest.fixture(scope="session")
def data_cfg(tmp_path_factory) -> DataConfig:
    """The DataConfig of the shared dataset."""
    return DataConfig(corpus=["demo_stdlib"], data_dir=str(tmp_path_factory.mktemp("stdlib_data")),
                      corpus_max_mb=1.0, vocab_size=VOCAB, tokenizer_sample_mb=1.0, seq_len=SEQ_LEN,
                      val_fraction=0.05, samples_per_shard=PER_SHARD, shuffle_buffer=64, prepare_workers=2)


@pytest.fixture(scope="session")
def prepared(data_cfg) -> dict:
    """The manifest of the shared dataset (built once per session)."""
    from data_pipeline.prepare import prepare_data

    return prepare_data(data_cfg)


@pytest.fixture(scope="session")
def make_cfg(data_cfg, prepared):
    """``make_cfg(num_workers=0, **data_overrides)`` -> an ExperimentConfig over the shared dataset."""

    def make(num_workers: int = 0, seed: int = 1234, data_dir: str | None = None, **data):
        over = {"corpus": "[demo_stdlib]", "data_dir": data_dir or data_cfg.data_dir, "seq_len": SEQ_LEN,
                "vocab_size": VOCAB, "corpus_max_mb": 1.0, "tokenizer_sample_mb": 1.0, "val_fraction": 0.05,
                "samples_per_shard": PER_SHARD, "shuffle_buffer": 64, "num_workers": num_workers,
                "order": "stream", **data}
        return load_config(None, [f"data.{k}={v}" for k, v in over.items()] + [f"train.seed={seed}"])

    return make


@pytest.fixture(scope="session")
def http_url(data_cfg, prepared):
    """The prepared data dir served over http on loopback."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=data_cfg.data_dir))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
