"""Fine-tuning inputs: task files read with `datasets`, one-line errors, encoding, metrics, config."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from launch.config import ConfigError, load_config
from pretrain.finetune import (
    TaskError,
    classification_metrics,
    collate,
    configured_labels,
    encode_examples,
    load_finetune_config,
    read_split,
)


def _f(**kw):
    return load_config(None, [f"finetune.{k}={v}" for k, v in kw.items()]).finetune


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_tsv_glue_layout_with_quotes_and_numbers(tmp_path):
    p = write(tmp_path / "train.tsv", 'sentence\tlabel\nit\'s "quoted\t1\n007\t0\nNA\t1\n')
    ex, labels = read_split(p, "train", _f(), None)
    assert ex.text == ['it\'s "quoted', "007", "NA"]  # GLUE quotes are text; cells stay strings
    assert labels == ["0", "1"] and ex.labels == [1, 0, 1]


def test_csv_pairs_and_jsonl(tmp_path):
    p = write(tmp_path / "dev.csv", 's1,s2,label\n"a, b",c,yes\nd,e,no\n')
    ex, labels = read_split(p, "validation", _f(text_column="s1", text_pair_column="s2"), ["no", "yes"])
    assert ex.text == ["a, b", "d"] and ex.pair == ["c", "e"] and ex.labels == [1, 0]
    j = tmp_path / "t.jsonl"
    j.write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in [("x y", 1), ("z", 0)]) + "\n")
    ex, labels = read_split(str(j), "train", _f(), None)
    assert ex.text == ["x y", "z"] and labels == ["0", "1"] and ex.labels == [1, 0]


def test_header_less_file_with_column_names(tmp_path):
    p = write(tmp_path / "cola.tsv", "src\t1\t\tgood sentence\nsrc\t0\t*\tbad sentence\n")
    f = _f(column_names="[source, label, mark, sentence]")
    ex, labels = read_split(p, "train", f, None)
    assert ex.text == ["good sentence", "bad sentence"] and ex.labels == [1, 0]


def test_missing_column_is_one_line(tmp_path):
    p = write(tmp_path / "train.tsv", "text\tlabel\nhello\t1\nbye\t0\n")
    with pytest.raises(TaskError) as e:
        read_split(p, "train", _f(), None)
    msg = one_line(e)
    assert "no column 'sentence'" in msg and "finetune.text_column" in msg and "text, label" in msg
    with pytest.raises(TaskError) as e:
        read_split(p, "train", _f(text_column="text", text_pair_column="hypothesis"), None)
    assert "'hypothesis'" in one_line(e)


def test_label_outside_the_set_is_one_line(tmp_path):
    p = write(tmp_path / "dev.tsv", "sentence\tlabel\na\t0\nb\t2\n")
    with pytest.raises(TaskError) as e:
        read_split(p, "validation", _f(), ["0", "1"])
    msg = one_line(e)
    assert "label '2'" in msg and "data row 2" in msg and "[0, 1]" in msg
    with pytest.raises(TaskError) as e:  # a configured set applies to the train file too
        read_split(p, "train", _f(labels="[neg, pos]"), configured_labels(_f(labels="[neg, pos]")))
    assert "finetune.labels" in one_line(e)


def test_other_bad_files(tmp_path):
    with pytest.raises(TaskError) as e:
        read_split(str(tmp_path / "nope.tsv"), "train", _f(), None)
    assert "does not exist" in one_line(e)
    with pytest.raises(TaskError) as e:
        read_split(write(tmp_path / "x.txt", "a\n"), "train", _f(), None)
    assert "finetune.file_format" in one_line(e)
    with pytest.raises(TaskError) as e:
        read_split(write(tmp_path / "one.tsv", "sentence\tlabel\na\t1\nb\t1\n"), "train", _f(), None)
    assert "single label" in one_line(e)
    with pytest.raises(TaskError) as e:
        read_split(write(tmp_path / "nolab.tsv", "sentence\tlabel\na\t\n"), "train", _f(), None)
    assert "no label" in one_line(e)
    # a test file may come without labels
    ex, _ = read_split(write(tmp_path / "test.tsv", "sentence\nq\n"), "test", _f(), ["0", "1"], require_labels=False)
    assert not ex.labelled


def test_encoding_truncates_longest_first(tmp_path):
    from pretrain.finetune import Examples

    class Tok:
        cls_id, sep_id, pad_id = 1, 2, 0

        def encode_batch(self, texts):
            import numpy as np

            return [np.arange(10, 10 + len(t.split())) for t in texts]

    ex = Examples("x", ["a b c d e f g h", "a"], ["x y", "p q r s t u v w"], [0, 1])
    enc = encode_examples(Tok(), ex, max_len=9)
    (ids0, tt0), (ids1, tt1) = enc
    assert len(ids0) == 9 and ids0[:1] == [1] and ids0.count(2) == 2 and tt0 == [0] * 6 + [1] * 3
    assert ids1 == [1, 10, 2, 10, 11, 12, 13, 14, 2] and tt1 == [0, 0, 0] + [1] * 6
    single = encode_examples(Tok(), Examples("x", ["a b c d e f g h"], None, [0]), max_len=5)
    assert single[0] == ([1, 10, 11, 12, 2], [0] * 5)
    batch = collate(enc + single, [0, 1, 0], pad_id=0)
    assert batch["input_ids"].shape == (3, 9) and batch["attention_mask"][2].tolist() == [1] * 5 + [0] * 4


def test_metrics_against_hand_computation():
    # rows: true class, columns: predicted
    m = classification_metrics(torch.tensor([[40.0, 10.0], [5.0, 45.0]]))
    tp, fp, fn, tn = 45, 10, 5, 40
    assert m["accuracy"] == pytest.approx(85 / 100)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["matthews"] == pytest.approx(mcc)
    constant = classification_metrics(torch.tensor([[0.0, 50.0], [0.0, 50.0]]))
    assert constant["matthews"] == 0.0 and constant["accuracy"] == 0.5
    three = classification_metrics(torch.eye(3) * 7)
    assert three["accuracy"] == three["f1"] == pytest.approx(1.0) and three["matthews"] == pytest.approx(1.0)


def test_finetune_config_takes_model_from_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    load_config(None, ["model.num_layers=3"]).dump(str(run / "config.yaml"))
    ft = write(tmp_path / "ft.yaml", "finetune: {epochs: 5, lr: 1e-4}\n")
    cfg = load_finetune_config(str(run), ft, ["finetune.micro_batch_size=8"])
    assert (cfg.model.num_layers, cfg.finetune.epochs, cfg.finetune.lr, cfg.finetune.micro_batch_size) == (3, 5, 1e-4, 8)
    with pytest.raises(ConfigError) as e:
        load_finetune_config(str(run), None, ["model.num_layers=2"])
    assert "only finetune.* keys" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_finetune_config(str(run), write(tmp_path / "bad.yaml", "model: {num_layers: 2}\n"), [])
    assert "finetune:" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_finetune_config(str(run), None, ["finetune.zero_stage=4"])
    assert "finetune.zero_stage" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_finetune_config(str(run), None, ["finetune.max_seq_len=4096"])
    assert "max_position_embeddings" in one_line(e)


def test_shipped_finetune_config_loads():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs", "finetune_demo.yaml"))
    assert cfg.finetune.text_column == "sentence"
