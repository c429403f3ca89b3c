"""After pretraining: MLM evaluation, export to Hugging Face, fine-tuning, bad input.

Reuses the cached 2-rank runs of test_train_deepspeed.py (same keys and overrides: no extra launch
when both files run in one session): ZeRO-1 and ZeRO-3 softmax, and Linformer (the efficient variant).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import sys

import pytest
import torch
from ds_launch import BIN, ROOT, run

pytestmark = pytest.mark.slow

ZERO0 = ("zero0", "train.steps=10", "train.zero_stage=0")  # no partitions: the module weights are the model
ZERO1 = ("zero1", "train.steps=20", "train.zero_stage=1")
ZERO3 = ("zero3", "train.steps=20", "train.zero_stage=3")
LINFORMER = ("variant_linformer", "train.steps=20", "train.save_every=0", "model.attention={name: linformer, k: 16}")


def _config_overrides(path: str) -> tuple[str, ...]:
    """A config file's own model/data/train keys as dotted overrides (its paths left out), applied after
    TINY so the launch trains what the file says on the test's tiny data."""
    import yaml

    own = yaml.safe_load(open(os.path.join(ROOT, path)))
    return tuple(f"{sec}.{k}={json.dumps(v)}" for sec in ("model", "data", "train") for k, v in own.get(sec, {}).items()
                 if k not in ("run_dir", "data_dir"))


# Checkpoints that learned context, for the fine-tuning bar: configs/demo_context_small.yaml (hidden 128,
# 1800 steps of 2 x 32 sequences, 40% masking; about 5 min each on 2 cores) on the tiny data.
CONTEXT = _config_overrides("configs/demo_context_small.yaml")
CONTEXT_SOFTMAX = ("context_softmax", *CONTEXT)
# Linformer with k=32 of 64 positions, E/F started as mean pooling over windows of 2 (a random E mixes all
# positions into every row and stays at the unigram plateau at this budget), and 1.5x softmax's steps.
CONTEXT_LINFORMER = ("context_linformer", *CONTEXT, "model.attention={name: linformer, k: 32, init: pool}",
                     "train.steps=2700")


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n---stderr---\n" + proc.stderr[-4000:]


def trained(runs, spec) -> str:
    run_dir, proc = runs.get(*spec)
    ok(proc)
    return run_dir


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------
# MLM evaluation and state dicts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [ZERO0, ZERO1, ZERO3, LINFORMER], ids=["zero0", "zero1", "zero3", "linformer"])
def test_evaluate_reproduces_the_logged_val_metrics(runs, spec):
    """`python -m pretrain.evaluate` on the trainer's val batches (2 data-parallel shares of 4 batches
    of 8) gives the val loss and accuracy the run logged at its last step: the gathered fp32 weights
    are the trained ones, whatever the ZeRO stage or variant."""
    run_dir = trained(runs, spec)
    proc = run([sys.executable, "-m", "pretrain.evaluate", "--run", run_dir, "--dp-size", "2",
                "--max-batches", "4", "--micro-batch-size", "8"])
    ok(proc)
    got = json.loads(proc.stdout)
    logged = json.load(open(os.path.join(run_dir, "status.json")))
    steps, stage = (10 if spec is ZERO0 else 20), {"zero0": 0, "zero3": 3}.get(spec[0], 1)
    assert (got["step"], got["zero_stage"]) == (steps, stage)
    assert got["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-5)
    assert got["val/mlm_accuracy"] == pytest.approx(logged["val/mlm_accuracy"], abs=1e-9)
    assert got["val/perplexity"] == pytest.approx(logged["val/perplexity"], rel=1e-4)
    assert got["val/tokens"] == logged["val/tokens"]


def test_zero1_and_zero3_checkpoints_gather_to_the_same_weights(runs):
    """The two runs train identically (same seed and data); ZeRO-3's gathered partitions equal ZeRO-1's."""
    from pretrain.state_dict import find_checkpoint, fp32_state_dict

    a = fp32_state_dict(find_checkpoint(trained(runs, ZERO1)))
    b = fp32_state_dict(find_checkpoint(trained(runs, ZERO3)))
    assert sorted(a) == sorted(b) and all(v.dtype == torch.float32 for v in b.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# --------------------------------------------------------------------------------------------
# Export to Hugging Face
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> tuple[str, str]:
    run_dir = trained(runs, ZERO3)  # ZeRO-3: partitions gathered before export
    out = str(tmp_path_factory.mktemp("hf") / "export")
    proc = run([sys.executable, "-m", "pretrain.export_hf", "--run", run_dir, "--out", out])
    ok(proc)
    return run_dir, out


def test_export_loads_in_transformers_with_the_same_logits(exported, tiny_data):
    from transformers import AutoTokenizer, MegatronBertForMaskedLM

    from data_pipeline.tokenizer import Tokenizer
    from pretrain.state_dict import find_checkpoint, init_single_process, load_model

    run_dir, out = exported
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    info = json.load(open(os.path.join(out, "bertforge_export.json")))
    assert info["zero_stage"] == 3 and info["max_abs_logit_diff"] <= 1e-4
    hf = MegatronBertForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    sp = Tokenizer.load(os.path.join(tiny_data, "tokenizer.model"))
    lines = [json.loads(ln)["text"].splitlines()[0] for ln in open(os.path.join(tiny_data, "corpus", "demo_stdlib.jsonl"))]
    lines = [ln for ln in lines if ln.strip()][:300]
    same = sum(hf_tok(ln, add_special_tokens=False)["input_ids"] == sp.encode(ln) for ln in lines)
    assert same >= 0.99 * len(lines), f"{same}/{len(lines)}"
    # bertforge's model and the export on real text: a padded batch of single sentences and a pair
    batch = hf_tok([lines[0], lines[1][:20], lines[2]], [lines[3], lines[4][:10], lines[5]], padding=True,
                   truncation=True, max_length=64, return_tensors="pt")
    init_single_process(0)
    bf = load_model(find_checkpoint(run_dir))
    with torch.no_grad():
        a = bf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               tokentype_ids=batch["token_type_ids"])
        b = hf(**batch).logits
    real = batch["attention_mask"].bool()
    assert a.shape == b.shape
    diff = (a - b).abs()[real].max().item()
    assert diff <= 1e-4, diff


def test_export_of_an_efficient_variant_is_one_clear_line(runs, tmp_path):
    proc = run([sys.executable, "-m", "pretrain.export_hf", "--run", trained(runs, LINFORMER),
                "--out", str(tmp_path / "x")])
    line = error_line(proc)
    assert "linformer" in line and "MegatronBertForMaskedLM" in line
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------

N_TRAIN, N_VAL, EPOCHS = 7600, 400, 4
BUDGET = [f"finetune.epochs={EPOCHS}", "finetune.lr=5e-4", "finetune.warmup_ratio=0.1", "finetune.log_every=50"]


def _capitalized(words: list[str]) -> list[str]:
    return [words[0][:1].upper() + words[0][1:], *words[1:]] if words[0].islower() else words


def shuffle_task(corpus: str, out_dir: str, seed: int = 0) -> tuple[str, str]:
    """Sentences of the demo corpus without punctuation; label: were the words shuffled? Half of each
    split is shuffled, sentences never repeat across splits. Case is kept as the corpus has it (the
    checkpoint's tokenizer splits "True" and "true" differently: lowercasing cost 5 points of
    fine-tuned accuracy, 0.67 vs 0.72, on a 17%-MLM checkpoint), except the one surface cue it
    gives: the first word's capital is removed and the capital put on whatever word comes first."""
    rng = random.Random(seed)
    seen, sents = set(), []
    for line in open(corpus):
        for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", json.loads(line)["text"]):
            words = re.sub(r"[^A-Za-z0-9 ]+", " ", s.replace("\n", " ")).split()
            if words and words[0][:1].isupper() and words[0][1:].islower():
                words[0] = words[0].lower()
            key = " ".join(words).lower()
            if 12 <= len(words) <= 40 and len(set(words)) >= 6 and key not in seen:
                seen.add(key)
                sents.append(words)
    rng.shuffle(sents)
    assert len(sents) >= N_TRAIN + N_VAL, len(sents)
    paths = []
    for name, part in (("train", sents[:N_TRAIN]), ("dev", sents[N_TRAIN:N_TRAIN + N_VAL])):
        rows = []
        for i, words in enumerate(part):
            if i % 2:
                shuffled = words[:]
                while shuffled == words:
                    rng.shuffle(shuffled)
                rows.append((" ".join(_capitalized(shuffled)), "shuffled"))
            else:
                rows.append((" ".join(_capitalized(words)), "original"))
        path = os.path.join(out_dir, f"{name}.tsv")
        with open(path, "w") as f:
            f.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def task(tiny_data, tmp_path_factory) -> tuple[str, str]:
    return shuffle_task(os.path.join(tiny_data, "corpus", "demo_stdlib.jsonl"), str(tmp_path_factory.mktemp("task")))


def task_args(task, out: str, *extra: str) -> list[str]:
    return [f"finetune.train_file={task[0]}", f"finetune.validation_file={task[1]}", f"finetune.output_dir={out}",
            *BUDGET, *extra]


def results(out: str) -> dict:
    return json.load(open(os.path.join(out, "results.json")))


@pytest.fixture(scope="module")
def finetuned(runs, task, tmp_path_factory) -> dict[str, dict]:
    """Fine-tuning at one budget (4 epochs, global batch 32): softmax from its context checkpoint under
    the deepspeed launcher (2 ranks x 16, ZeRO-1), and in one process (1 x 32) softmax from random init
    and Linformer from its checkpoint and from random init."""
    from ds_launch import _port

    base = tmp_path_factory.mktemp("finetune")
    softmax, linformer = trained(runs, CONTEXT_SOFTMAX), trained(runs, CONTEXT_LINFORMER)
    out = {}
    launched = str(base / "softmax_pretrained")
    unlabelled = str(base / "test.tsv")  # the dev sentences without their labels: predictions are written
    with open(task[1]) as src, open(unlabelled, "w") as dst:
        dst.writelines(line.split("\t")[0] + "\n" for line in src)
    proc = run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
                "pretrain/finetune.py", "--run", softmax,
                *task_args(task, launched, "finetune.micro_batch_size=16", "finetune.zero_stage=1",
                           f"finetune.test_file={unlabelled}")])
    ok(proc)
    out["softmax_pretrained"] = results(launched)
    # the three one-process runs share one interpreter (one start-up)
    jobs = {"softmax_random": (softmax, "random"), "linformer_pretrained": (linformer, "pretrained"),
            "linformer_random": (linformer, "random")}
    calls = [(rd, task_args(task, str(base / key), "finetune.micro_batch_size=32", f"finetune.init={init}"))
             for key, (rd, init) in jobs.items()]
    driver = ("import json, sys\nfrom launch.train import setup_logging\nfrom pretrain.finetune import finetune\n"
              "setup_logging(0)\nfor run_dir, overrides in json.loads(sys.argv[1]):\n"
              "    finetune(run_dir, None, overrides)\n")
    proc = run([sys.executable, "-c", driver, json.dumps(calls)], extra_env={"OMP_NUM_THREADS": "2"})  # both cores
    ok(proc)
    for key in jobs:
        out[key] = results(str(base / key))
    summary = {k: {"init": v["init"], "attention": v["attention"], "steps": v["steps"], **v["validation"]}
               for k, v in out.items()}
    sys.stderr.write("fine-tuning results: " + json.dumps(summary) + "\n")
    return out


def test_finetune_under_the_launcher_reports_metrics_and_tensorboard(finetuned):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = finetuned["softmax_pretrained"]
    assert r["world_size"] == 2 and r["init"] == "pretrained" and r["labels"] == ["original", "shuffled"]
    assert r["steps"] == EPOCHS * (N_TRAIN // 32) and r["train_examples"] == N_TRAIN
    for m in ("accuracy", "f1", "matthews", "loss"):
        assert m in r["validation"]
    assert 0.0 <= r["validation"]["accuracy"] <= 1.0 and -1.0 <= r["validation"]["matthews"] <= 1.0
    assert [h["epoch"] for h in r["history"]] == [float(e + 1) for e in range(EPOCHS)]
    preds = open(r["test_predictions"]).read().splitlines()  # gathered from both ranks, in file order
    assert preds[0] == "index\tprediction" and len(preds) == N_VAL + 1
    assert [p.split("\t")[0] for p in preds[1:]] == [str(i) for i in range(N_VAL)]
    assert {p.split("\t")[1] for p in preds[1:]} <= {"original", "shuffled"}
    tags = set()
    for f in glob.glob(os.path.join(r["output_dir"], "tb", "events.out.tfevents.*")):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in ("finetune/train_loss", "finetune/train_accuracy", "finetune/lr", "finetune/val_accuracy",
                "finetune/val_f1", "finetune/val_matthews", "finetune/val_loss"):
        assert tag in tags, (tag, sorted(tags))


@pytest.mark.parametrize("variant", ["softmax", "linformer"])
def test_finetune_beats_random_init_and_reaches_80pct(finetuned, variant):
    """The issue's bar: >= 80% validation accuracy (chance: 50%) and better than random init at the
    same budget (4 epochs of 7600 sentences, lr 5e-4, global batch 32), from the CONTEXT checkpoints.

    Softmax must meet it: its pretraining leaves the MLM unigram plateau between steps 600 and 1200
    (train loss 4.59 -> 3.78; val MLM accuracy 28.2% at step 1800) and fine-tunes to 0.845 vs 0.68
    from random init (measured 2026-12-07; 0.86 vs 0.675 in a one-process run).
    Linformer (k=32 of 64 positions, ``init: pool``, 2700 steps: MLM 31.4%) fine-tunes to 0.815 vs
    0.6425 from random init (measured 2026-12-07, one process); since its layers compress their input
    before the K/V linear layers (the same math, other float rounding) 0.8075 vs 0.665. With the default random E it
    stays at the unigram plateau (k=16, 1800 steps: MLM 16.6%, fine-tuned 0.70); pool init at 1800 steps
    gets k=16 to 22.6% / 0.76 and k=32 to 27.0% / 0.79. BERT-LSH (MLM 20.4% at 1800 steps, fine-tuned
    0.68) costs 2.2x softmax per step, so it is not the efficient variant here."""
    pre, rnd = finetuned[f"{variant}_pretrained"], finetuned[f"{variant}_random"]
    assert pre["steps"] == rnd["steps"] and pre["attention"] == rnd["attention"] == [variant] * 2
    acc, acc_random = pre["validation"]["accuracy"], rnd["validation"]["accuracy"]
    mlm_acc = json.load(open(os.path.join(pre["run"], "status.json")))["val/mlm_accuracy"]
    numbers = dict(accuracy=acc, random_init=acc_random, mlm_accuracy=round(mlm_acc, 4))
    assert acc > acc_random, numbers
    assert acc >= 0.8, numbers


# --------------------------------------------------------------------------------------------
# Bad input: one clear line each (checked before any process group or weights)
# --------------------------------------------------------------------------------------------


def _finetune_error(capsys, run_dir: str, *overrides: str) -> str:
    from pretrain.finetune import main

    assert main(["--run", run_dir, *overrides]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1
    return err[0]


def test_task_file_with_missing_columns(runs, task, tmp_path, capsys):
    bad = tmp_path / "train.tsv"
    bad.write_text("text\tlabel\nsome words here\toriginal\nwords some here\tshuffled\n")
    line = _finetune_error(capsys, trained(runs, ZERO1), f"finetune.train_file={bad}",
                           f"finetune.validation_file={task[1]}")
    assert "no column 'sentence'" in line and "finetune.text_column" in line and str(bad) in line


def test_labels_not_in_the_label_set(runs, task, tmp_path, capsys):
    bad = tmp_path / "dev.tsv"
    bad.write_text("sentence\tlabel\na b c\toriginal\nc b a\treversed\n")
    line = _finetune_error(capsys, trained(runs, ZERO1), f"finetune.train_file={task[0]}",
                           f"finetune.validation_file={bad}")
    assert "label 'reversed'" in line and "[original, shuffled]" in line


def test_checkpoint_of_another_tokenizer(runs, task, tmp_path, capsys):
    from data_pipeline.tokenizer import train_tokenizer
    from pretrain.export_hf import main as export_main

    other = train_tokenizer([open(task[0]).read()], str(tmp_path / "other"), vocab_size=200, num_threads=1)
    line = _finetune_error(capsys, trained(runs, ZERO1), f"finetune.train_file={task[0]}",
                           f"finetune.validation_file={task[1]}", f"finetune.tokenizer={other.path}")
    assert "is not the tokenizer checkpoint" in line and other.sha256[:12] in line
    assert export_main(["--run", trained(runs, ZERO1), "--out", str(tmp_path / "x"), "--tokenizer", other.path]) == 2
    assert "is not the tokenizer checkpoint" in capsys.readouterr().err
