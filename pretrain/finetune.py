"""Sequence classification (single sentences or pairs) starting from a pretraining checkpoint.

    python -m pretrain.finetune --run runs/demo --config configs/finetune_demo.yaml \\
        finetune.train_file=glue/SST-2/train.tsv finetune.validation_file=glue/SST-2/dev.tsv
    deepspeed --num_gpus 2 pretrain/finetune.py --run runs/demo --config configs/finetune_demo.yaml ...

The model shape, attention variants and tokenizer come from the run (``<run_dir>/config.yaml``);
``--config`` (a YAML holding a ``finetune:`` section) and ``finetune.key=value`` overrides set the
task and the hyper-parameters (launch.config.FinetuneConfig documents every key). Any variant and
any ZeRO stage of the pretraining checkpoint (it is gathered into one fp32 state dict first); the
fine-tuning itself runs in a DeepSpeed engine (finetune.zero_stage) under the deepspeed launcher,
torchrun, srun, or in one process.

Task files: local GLUE-format TSV (no quoting, as GLUE ships them), CSV or JSONL, read with
``datasets``; a text column, an optional second text column for pairs, a label column. Inputs are
``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (token types 0 / 1, longest-first truncation). The
classifier reads the final hidden state of [CLS] (after the encoder's final LayerNorm) through a
tanh pooler (dense H -> H), dropout and a linear layer, as BERT's; the MLM head is dropped.

On CPU, subnormal floats are flushed to zero while fine-tuning (they made pretrained weights and
their AdamW state many times slower than random ones).

Metrics (validation after every epoch or finetune.eval_every steps, test at the end): accuracy, F1
(of the second label for two labels, macro-F1 otherwise: GLUE's MRPC/QQP use it) and Matthews
correlation (CoLA's). TensorBoard tags under ``finetune/`` in ``<output_dir>/tb``; results.json in
``<output_dir>``; the final results as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

logger = logging.getLogger(__name__)

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class TaskError(ValueError):
    """A task file or label set that cannot be used; the message is one line that says how to fix it."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def load_finetune_config(run_dir: str, config: str | None = None, overrides: list[str] | None = None,
                         world_size: int | None = None):
    """The run's resolved config with the ``finetune`` section of ``config`` and ``finetune.*`` overrides.

    Raises:
        ConfigError: a key outside ``finetune`` (the model and data belong to the run), or a bad value.
    """
    from launch.config import ConfigError, ExperimentConfig, _build, _deep_merge, _read_yaml, apply_overrides

    data = _read_yaml(os.path.join(run_dir, "config.yaml"))
    if config:
        extra = _read_yaml(config)
        other = sorted(k for k in extra if k != "finetune")
        if other:
            raise ConfigError(f"{config}: fine-tuning takes the model and data from the run's config.yaml; only a "
                              f"'finetune:' section may be given here (found: {', '.join(other)})")
        data = _deep_merge(data, extra)
    for text in overrides or []:
        if not text.lstrip("-").startswith("finetune."):
            raise ConfigError(f"override '{text}': only finetune.* keys can be set for fine-tuning "
                              "(the model and data come from the run's config.yaml)")
    data = apply_overrides(data, overrides or [])
    cfg = _build(ExperimentConfig, data, "")
    cfg.validate(world_size)
    return cfg


# --------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------


def file_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise TaskError(f"cannot tell the format of {path} from its extension; name it .tsv, .csv or .jsonl or set "
                        "finetune.file_format")
    return FORMATS[ext]


def read_table(path: str, fmt: str = "auto", column_names: list[str] | None = None) -> dict[str, list]:
    """Columns of a local TSV / CSV / JSONL file as lists, read with ``datasets`` (TSV/CSV cells as strings).

    Raises:
        TaskError: missing or unreadable file.
    """
    if not os.path.isfile(path):
        raise TaskError(f"task file {path} does not exist")
    fmt = file_format(path, fmt)
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    kwargs: dict = {}
    if fmt in ("tsv", "csv"):
        delimiter = "\t" if fmt == "tsv" else ","
        names = list(column_names or [])
        if not names:
            with open(path, newline="", encoding="utf-8") as f:
                names = next(csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if fmt == "tsv"
                                        else csv.QUOTE_MINIMAL), [])
        if not names:
            raise TaskError(f"task file {path} is empty")
        if len(set(names)) != len(names):
            raise TaskError(f"task file {path} repeats a column name in its header {names}")
        kwargs = {"delimiter": delimiter, "keep_default_na": False, "na_filter": False,
                  "features": datasets.Features({n: datasets.Value("string") for n in names})}
        if fmt == "tsv":  # GLUE's TSVs hold unbalanced quotes; they are text, not CSV quoting
            kwargs["quoting"] = csv.QUOTE_NONE
        if column_names:
            kwargs["column_names"] = names
    builder = "csv" if fmt in ("tsv", "csv") else "json"
    try:
        with tempfile.TemporaryDirectory(prefix="bertforge_task_") as cache:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache, **kwargs)
            table = ds.to_dict()
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow/pandas raise many types for a bad file
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TaskError(f"cannot read {path} as {fmt.upper()} ({type(e).__name__}: {msg[:200]})") from None
    return table


def label_str(value) -> str | None:
    """A label as the string it is compared by (1, 1.0 and "1" are the same label; None = missing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


@dataclasses.dataclass
class Examples:
    """One split of a task: texts and label indices (-1 where the file has no labels)."""

    path: str
    text: list[str]
    pair: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.text)

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and self.labels[0] >= 0


def _texts(table: dict, column: str, role: str, path: str) -> list[str]:
    out = []
    for i, v in enumerate(table[column]):
        if v is None:
            raise TaskError(f"{role} file {path}: data row {i + 1} has no value in column '{column}'")
        out.append(str(v))
    return out


def read_split(path: str, role: str, f, label_set: list[str] | None, require_labels: bool = True
               ) -> tuple[Examples, list[str]]:
    """Read and check one task file; returns its examples and the label set (inferred from this file
    when ``label_set`` is None).

    Raises:
        TaskError: one line: missing column, missing label, label outside the set, no examples.
    """
    table = read_table(path, f.file_format, f.column_names)
    columns = list(table)
    needed = [("text_column", f.text_column)]
    if f.text_pair_column:
        needed.append(("text_pair_column", f.text_pair_column))
    has_labels = f.label_column in table
    if require_labels or has_labels:
        needed.append(("label_column", f.label_column))
    for key, col in needed:
        if col not in table:
            raise TaskError(f"{role} file {path} has no column '{col}' (finetune.{key}); its columns: "
                            f"{', '.join(columns)}")
    n = len(table[f.text_column])
    if n == 0:
        raise TaskError(f"{role} file {path} holds no examples")
    text = _texts(table, f.text_column, role, path)
    pair = _texts(table, f.text_pair_column, role, path) if f.text_pair_column else None
    if not has_labels:
        return Examples(path, text, pair, [-1] * n), label_set or []
    raw = [label_str(v) for v in table[f.label_column]]
    for i, v in enumerate(raw):
        if v is None:
            raise TaskError(f"{role} file {path}: data row {i + 1} has no label (column '{f.label_column}')")
    if label_set is None:
        distinct = set(raw)
        numeric = all(_is_int(v) for v in distinct)
        label_set = sorted(distinct, key=(lambda v: int(v)) if numeric else None)
        if len(label_set) < 2:
            raise TaskError(f"{role} file {path} holds a single label {label_set}; classification needs two or "
                            "more (or list them in finetune.labels)")
    index = {v: k for k, v in enumerate(label_set)}
    for i, v in enumerate(raw):
        if v not in index:
            source = "finetune.labels" if f.labels else "the labels of the train file"
            raise TaskError(f"{role} file {path}: label '{v}' (data row {i + 1}) is not in the label set "
                            f"[{', '.join(label_set)}] ({source}); fix the file or set finetune.labels")
    return Examples(path, text, pair, [index[v] for v in raw]), label_set


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def configured_labels(f) -> list[str] | None:
    if not f.labels:
        return None
    labels = [label_str(v) for v in f.labels]
    if None in labels or len(set(labels)) != len(labels) or len(labels) < 2:
        raise TaskError(f"finetune.labels={f.labels!r} must list two or more distinct, non-empty labels")
    return labels


# --------------------------------------------------------------------------------------------
# Encoding and batches
# --------------------------------------------------------------------------------------------


def encode_examples(tok, ex: Examples, max_len: int) -> list[tuple[list[int], list[int]]]:
    """``(input ids, token types)`` of every example: [CLS] a [SEP] (b [SEP]), longest-first truncation."""
    a_ids = tok.encode_batch(ex.text)
    b_ids = tok.encode_batch(ex.pair) if ex.pair is not None else None
    out = []
    for i, a in enumerate(a_ids):
        a = a.tolist()
        if b_ids is None:
            a = a[: max_len - 2]
            out.append(([tok.cls_id, *a, tok.sep_id], [0] * (len(a) + 2)))
            continue
        b = b_ids[i].tolist()
        budget = max_len - 3
        la, lb = len(a), len(b)
        while la + lb > budget:  # longest first
            if la >= lb:
                la -= 1
            else:
                lb -= 1
        a, b = a[:la], b[:lb]
        out.append(([tok.cls_id, *a, tok.sep_id, *b, tok.sep_id], [0] * (la + 2) + [1] * (lb + 1)))
    return out


def collate(encoded: list[tuple[list[int], list[int]]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (1 = real), token_type_ids, labels: [b, s] / [b]."""
    s = max(len(ids) for ids, _ in encoded)
    b = len(encoded)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    token_types = torch.zeros((b, s), dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    for i, (ids, tt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        token_types[i, : len(tt)] = torch.tensor(tt)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types,
            "labels": torch.tensor(labels, dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# Model and metrics
# --------------------------------------------------------------------------------------------


class BertClassifier(nn.Module):
    """The pretrained encoder (embeddings + transformer block of a BertMLM) with a [CLS] classifier.

    The MLM head and output layer are dropped; pooler and classifier are plain replicated layers
    (their gradients are equal on every tensor-parallel rank) initialised like megatron's weights.
    """

    def __init__(self, mlm: nn.Module, num_labels: int, dropout: float, init_std: float) -> None:
        super().__init__()
        hidden = mlm.config.hidden_size
        self.embedding, self.encoder = mlm.embedding, mlm.encoder
        self.pooler = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        for layer in (self.pooler, self.classifier):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (1 = real), token_type_ids: [b, s] -> logits [b, num_labels]."""
        ext_mask = (attention_mask < 0.5)[:, None, None, :]  # [b, 1, 1, s], True = masked out (megatron's)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        hidden = self.embedding(input_ids=input_ids, position_ids=position_ids, tokentype_ids=token_type_ids)
        hidden = self.encoder(hidden_states=hidden, attention_mask=ext_mask)  # [s, b, h], final LN applied
        pooled = torch.tanh(self.pooler(hidden[0]))  # [CLS]: [b, h]
        return self.classifier(self.dropout(pooled))


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy, f1 (binary: of class 1; else macro) and matthews from ``confusion[true, predicted]``."""
    c = confusion.double()
    total = c.sum().item()
    correct = c.trace().item()
    true, pred = c.sum(1), c.sum(0)
    tp = c.diag()
    f1s = torch.where(true + pred > 0, 2 * tp / (true + pred).clamp(min=1e-12), torch.zeros_like(tp))
    f1 = f1s[1].item() if c.shape[0] == 2 else f1s.mean().item()
    denom = math.sqrt(max(total**2 - (pred**2).sum().item(), 0.0) * max(total**2 - (true**2).sum().item(), 0.0))
    mcc = (correct * total - (pred * true).sum().item()) / denom if denom > 0 else 0.0
    return {"accuracy": correct / total if total else 0.0, "f1": f1, "matthews": mcc}


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def default_output_dir(run_dir: str, f) -> str:
    task = f.task_name or os.path.basename(os.path.dirname(os.path.abspath(f.train_file))) or "task"
    return os.path.join(run_dir, "finetune", task + ("_random" if f.init == "random" else ""))


class Finetuner:
    """Loads the task and the model, trains with DeepSpeed, evaluates; ``run()`` returns the results."""

    def __init__(self, run: str, cfg) -> None:
        """Check the run, tokenizer and task files and encode the examples (no process group needed:
        bad input fails here, before any weights are read or ranks started)."""
        from data_pipeline.tokenizer import Tokenizer, sha256_file
        from pretrain.state_dict import check_tokenizer, find_checkpoint, locate_run

        self.cfg, self.f = cfg, cfg.finetune
        f = self.f
        self.run_dir, _, _ = locate_run(run)
        if not f.train_file or not f.validation_file:
            raise TaskError("finetune.train_file and finetune.validation_file are required (local .tsv/.csv/.jsonl)")
        if cfg.parallel.tensor_model_parallel_size > 1:
            raise TaskError("fine-tuning runs with parallel.tensor_model_parallel_size=1 only (checkpoints are "
                            "gathered into one fp32 state dict)")
        self.tok_path = f.tokenizer or os.path.join(cfg.data.data_dir, "tokenizer.model")
        if not os.path.isfile(self.tok_path):
            raise TaskError(f"tokenizer {self.tok_path} not found; set finetune.tokenizer to the run's tokenizer.model")
        self.ck = None
        if f.init == "pretrained":
            self.ck = find_checkpoint(run, f.checkpoint_tag or None)
            check_tokenizer(self.ck, sha256_file(self.tok_path), f"finetune.tokenizer {self.tok_path}")
        self.tok = Tokenizer.load(self.tok_path)
        self.max_len = f.max_seq_len or cfg.model.max_position_embeddings
        labels = configured_labels(f)
        self.train_ex, self.labels = read_split(f.train_file, "train", f, labels)
        self.val_ex, _ = read_split(f.validation_file, "validation", f, self.labels)
        self.test_ex = read_split(f.test_file, "test", f, self.labels, require_labels=False)[0] if f.test_file else None
        self.encoded = {name: encode_examples(self.tok, ex, self.max_len)
                        for name, ex in (("train", self.train_ex), ("validation", self.val_ex),
                                         ("test", self.test_ex)) if ex is not None}
        self.output_dir = f.output_dir or default_output_dir(self.run_dir, f)

    def setup(self, info) -> None:
        """Plan the steps for this world and build the classifier (pretrained weights gathered here)."""
        from pretrain.state_dict import CheckpointError, build_from_state_dict, fp32_state_dict, vocab_rows

        f, cfg = self.f, self.cfg
        self.info = info
        g = info.dp_size * f.micro_batch_size
        self.steps_per_epoch = len(self.train_ex) // g
        if self.steps_per_epoch == 0:
            raise TaskError(f"train file {f.train_file} holds {len(self.train_ex)} examples, fewer than one step of "
                            f"{info.dp_size} rank(s) x finetune.micro_batch_size={f.micro_batch_size}")
        self.total_steps = self.steps_per_epoch * f.epochs
        if f.max_steps:
            self.total_steps = min(self.total_steps, f.max_steps)
        sd = None
        if self.ck is not None:
            sd = fp32_state_dict(self.ck)
            if self.tok.vocab_size > vocab_rows(sd):
                raise CheckpointError(f"tokenizer {self.tok_path} has {self.tok.vocab_size} pieces, more than the "
                                      f"checkpoint's {vocab_rows(sd)} embedding rows")
        torch.manual_seed(f.seed)  # random init, pooler and classifier: the same on every rank
        model_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16=f.bf16))  # precision: ours
        mlm = build_from_state_dict(model_cfg, sd, vocab_rows(sd) if sd is not None else self.tok.vocab_size)
        self.model = BertClassifier(mlm, len(self.labels), f.classifier_dropout, cfg.model.init_method_std)

    # ---------------------------------------------------------------- engine
    def build_engine(self):
        from pretrain.trainer import build_engine

        f, t = self.f, self.cfg.train
        train = dataclasses.replace(
            t, steps=self.total_steps, micro_batch_size=f.micro_batch_size, gradient_accumulation_steps=1,
            lr=f.lr, min_lr=0.0, warmup_steps=int(f.warmup_ratio * self.total_steps), lr_decay="linear",
            lr_decay_steps=0,  # decay over this fine-tuning, not over a pretraining run's extended schedule
            weight_decay=f.weight_decay, grad_clip=f.grad_clip, zero_stage=f.zero_stage, bf16=f.bf16)
        ds_cfg = dataclasses.replace(self.cfg, train=train)
        return build_engine(ds_cfg, self.model, self.info)

    def _batch(self, split: str, idx: list[int]) -> dict[str, torch.Tensor]:
        ex = {"train": self.train_ex, "validation": self.val_ex, "test": self.test_ex}[split]
        enc = self.encoded[split]
        b = collate([enc[i] for i in idx], [ex.labels[i] for i in idx], self.tok.pad_id)
        return {k: v.to(self.info.device) for k, v in b.items()}

    @torch.no_grad()
    def evaluate(self, engine, split: str) -> tuple[dict[str, float], list[int] | None]:
        """Metrics of ``split`` (ranks score contiguous shares; sums reduced over data parallelism), and
        every example's predicted class index on rank 0 when the split has no labels."""
        import torch.distributed as dist

        from launch.distributed import all_reduce_sum, data_parallel_group

        ex = {"validation": self.val_ex, "test": self.test_ex}[split]
        n, r, dp = len(ex), self.info.dp_rank, self.info.dp_size
        lo, hi = r * n // dp, (r + 1) * n // dp
        k = len(self.labels)
        confusion = torch.zeros(k, k, dtype=torch.float64)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        preds: list[int] = []
        engine.eval()
        mb = 2 * self.f.micro_batch_size
        # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each)
        for b in range(math.ceil(math.ceil(n / dp) / mb)):
            idx = list(range(lo + b * mb, min(lo + (b + 1) * mb, hi)))
            batch = self._batch(split, idx or [0])
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"]).float()
            if not idx:
                continue  # a rank whose share ran out keeps step with the others
            pred = logits.argmax(-1)
            preds += pred.tolist()
            if ex.labelled:
                loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                confusion.index_put_((batch["labels"].cpu(), pred.cpu()), torch.ones(len(idx), dtype=torch.float64),
                                     accumulate=True)
        engine.train()
        if not ex.labelled:
            gathered: list = [preds]
            if dp > 1:
                gathered = [None] * dp
                dist.all_gather_object(gathered, preds, group=data_parallel_group())
            return {}, [p for part in gathered for p in part]
        both = all_reduce_sum(torch.cat([confusion.flatten(), loss_sum]), data_parallel_group())
        confusion = both[:-1].view(k, k)
        metrics = classification_metrics(confusion)
        metrics["loss"] = both[-1].item() / max(confusion.sum().item(), 1.0)
        return metrics, None

    def run(self) -> dict:
        from model.attention.base import set_seed, set_step
        from model.bert import layer_attention_configs
        from pretrain.metrics import Metrics

        f, info = self.f, self.info
        t0 = time.perf_counter()
        engine, _, scheduler = self.build_engine()
        torch.manual_seed(f.seed + 1000 * info.dp_rank)  # dropout differs across data-parallel ranks
        set_seed(f.seed)
        if info.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
        metrics = Metrics(self.output_dir, info.is_main)
        attention = [c.name for c in layer_attention_configs(self.cfg)]
        logger.info("fine-tuning %s (%s) on %s: %d train / %d validation examples, labels %s, %d steps "
                    "(%d per epoch) of %d x %d, max %d tokens, attention %s, ZeRO-%d",
                    self.ck.describe() if self.ck else "a randomly initialised model", f.init, f.train_file,
                    len(self.train_ex), len(self.val_ex), self.labels, self.total_steps, self.steps_per_epoch,
                    info.dp_size, f.micro_batch_size, self.max_len, attention, f.zero_stage)
        history: list[dict] = []
        window = torch.zeros(3, dtype=torch.float64)  # loss sum, examples, correct
        step, epoch, last_val = 0, 0, None
        g = info.dp_size * f.micro_batch_size
        while step < self.total_steps:
            perm = torch.randperm(len(self.train_ex), generator=torch.Generator().manual_seed(f.seed * 1000 + epoch))
            for s in range(self.steps_per_epoch):
                if step >= self.total_steps:
                    break
                rows = perm[s * g + info.dp_rank * f.micro_batch_size: s * g + (info.dp_rank + 1) * f.micro_batch_size]
                batch = self._batch("train", rows.tolist())
                set_step(step)
                logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"]).float()
                loss = F.cross_entropy(logits, batch["labels"])
                engine.backward(loss)
                engine.step()
                step += 1
                window += torch.tensor([loss.item() * len(rows), len(rows),
                                        (logits.argmax(-1) == batch["labels"]).sum().item()], dtype=torch.float64)
                if step % f.log_every == 0 or step == self.total_steps:
                    self._log_train(window, step, scheduler.get_last_lr()[0], metrics)
                    window.zero_()
                end_of_epoch = s == self.steps_per_epoch - 1
                if (f.eval_every and step % f.eval_every == 0) or (not f.eval_every and end_of_epoch) \
                        or step == self.total_steps:
                    last_val, _ = self.evaluate(engine, "validation")
                    metrics.scalars(step, {f"finetune/val_{k}": v for k, v in last_val.items()})
                    history.append({"step": step, "epoch": epoch + (s + 1) / self.steps_per_epoch, **last_val})
                    if info.is_main:
                        logger.info("step %d/%d (epoch %.2f): validation %s", step, self.total_steps,
                                    history[-1]["epoch"], _fmt(last_val))
            epoch += 1
        result = {"task": f.task_name or os.path.basename(os.path.dirname(os.path.abspath(f.train_file))),
                  "run": self.run_dir, "checkpoint": self.ck.path if self.ck else None, "init": f.init,
                  "attention": attention, "labels": self.labels, "train_examples": len(self.train_ex),
                  "validation_examples": len(self.val_ex), "steps": step, "epochs": step / self.steps_per_epoch,
                  "world_size": info.world_size, "zero_stage": f.zero_stage, "validation": last_val,
                  "history": history, "output_dir": self.output_dir}
        if self.test_ex is not None:
            test_metrics, preds = self.evaluate(engine, "test")
            if preds is not None:
                result["test_predictions"] = os.path.join(self.output_dir, "test_predictions.tsv")
                if info.is_main:
                    with open(result["test_predictions"], "w") as fh:
                        fh.write("index\tprediction\n")
                        fh.writelines(f"{i}\t{self.labels[p]}\n" for i, p in enumerate(preds))
            else:
                result["test"] = test_metrics
                metrics.scalars(step, {f"finetune/test_{k}": v for k, v in test_metrics.items()})
        if f.save_checkpoint:
            engine.save_checkpoint(os.path.join(self.output_dir, "checkpoints"), tag=f"global_step{step}",
                                   client_state={"step": step, "labels": self.labels})
        result["seconds"] = time.perf_counter() - t0
        metrics.close()
        if info.is_main:
            with open(os.path.join(self.output_dir, "results.json"), "w") as fh:
                json.dump(result, fh, indent=1)
        return result

    def _log_train(self, window: torch.Tensor, step: int, lr: float, metrics) -> None:
        from launch.distributed import all_reduce_sum, data_parallel_group

        red = all_reduce_sum(window, data_parallel_group())
        n = max(red[1].item(), 1.0)
        values = {"finetune/train_loss": red[0].item() / n, "finetune/train_accuracy": red[2].item() / n,
                  "finetune/lr": lr}
        metrics.scalars(step, values)
        if self.info.is_main:
            logger.info("step %d/%d | loss %.4f | acc %.3f | lr %.3g", step, self.total_steps,
                        values["finetune/train_loss"], values["finetune/train_accuracy"], lr)


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


def finetune(run: str, config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Fine-tune on the task of ``config`` / ``overrides`` from run ``run``; returns the results
    (every rank; rank 0 also writes them). Starts the process group if needed."""
    from pretrain.state_dict import locate_run

    run_dir, _, _ = locate_run(run)
    cfg = load_finetune_config(run_dir, config, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    tuner = Finetuner(run, cfg)  # bad input fails here, before a process group exists
    from launch.distributed import init_distributed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = init_distributed(1, cfg.finetune.seed)
    tuner.setup(info)
    # On CPU, subnormal floats take a slow microcode path in every elementwise kernel and GEMM.
    # Pretrained weights and AdamW's second moments hold many of them (a 2-layer checkpoint
    # fine-tuned 15x slower than the same model from random init: 36 s vs 2.3 s for 30 steps);
    # flushing them to zero changes no result that matters and is undone afterwards.
    flush = torch.device(info.device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        return tuner.run()
    finally:
        if flush:
            torch.set_flush_denormal(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="pretraining run dir (or its checkpoints/global_stepN)")
    parser.add_argument("--config", default=None, help="YAML with a finetune: section (configs/finetune_*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="finetune.* overrides, e.g. finetune.train_file=train.tsv")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    from launch.cli import error_exit, setup_logging

    setup_logging(rank)
    from data_pipeline.errors import DataError
    from launch.config import ConfigError
    from pretrain.state_dict import CheckpointError

    try:
        result = finetune(args.run, args.config, args.overrides)
    except (TaskError, CheckpointError, ConfigError, DataError) as e:
        return error_exit(e, rank)
    from launch.distributed import shutdown_distributed

    shutdown_distributed()
    if rank == 0:
        sys.stdout.write(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
