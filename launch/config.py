"""Typed experiment config: YAML files with ``inherit:``, dotted CLI overrides, loud validation.

Precedence: dataclass defaults < YAML (parents first, via ``inherit:``) < ``key=value`` overrides.
Every field carries an attribute docstring; every error is one line that names the dotted key and
the valid choices. This module is torch-free so configs can be checked without the stack.

    cfg = load_config("configs/demo.yaml", ["model.num_layers=4", "train.lr=1e-3"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line that says how to fix it."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of the megatron-core BERT encoder and the choice of self-attention."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Attention heads per layer; must divide hidden_size."""
    ffn_hidden_size: int = 0
    """Width of the MLP; 0 means 4 * hidden_size."""
    max_position_embeddings: int = 512
    """Size of the learned absolute position table; must be >= data.seq_len."""
    vocab_size: int = 0
    """Embedding rows; 0 means the tokenizer's vocabulary size (padded for tensor parallelism)."""
    hidden_dropout: float = 0.1
    """Dropout on the residual branches."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (variants without probabilities ignore it)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    attention: dict = field(default_factory=lambda: {"name": "softmax"})
    """Default self-attention of every layer: ``{name: <variant>, <variant fields>...}``."""
    layer_attention: list = field(default_factory=list)
    """Per-layer overrides: a list with one attention dict (or null) per layer, or rules
    ``{layers: [first, last], name: ..., <fields>}`` (inclusive range) that replace the default."""


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and sharded, and how batches are masked."""

    corpus: list = field(default_factory=lambda: ["demo"])
    """Input text: ``.txt`` / ``.jsonl`` paths or globs; the word ``demo`` builds the embedded default
    corpus from docstrings already on the machine, ``demo_stdlib`` a small fixed stdlib slice."""
    data_dir: str = "data/demo"
    """Directory holding the tokenizer, the shards (train-*.tar, val-*.tar) and manifest.json."""
    corpus_max_mb: float = 48.0
    """Cap on the size of the gathered demo corpus, in MB of text."""
    vocab_size: int = 8192
    """Size of the sentencepiece vocabulary to train (special tokens included)."""
    tokenizer_type: Literal["unigram", "bpe"] = "unigram"
    """Sentencepiece model type."""
    tokenizer_sample_mb: float = 16.0
    """MB of text sampled to train the tokenizer (the whole corpus is still sharded)."""
    tokenizer_model: str = ""
    """An existing sentencepiece model to shard with instead of training one, e.g. another data dir's
    ``tokenizer.model`` (its vocabulary size must equal data.vocab_size). Dirs prepared with the same
    model share a tokenizer and can be blended (data.blend). Empty = train one from the corpus."""
    seq_len: int = 128
    """Tokens per packed sequence, [CLS] and [SEP] included."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation."""
    samples_per_shard: int = 10000
    """Sequences per webdataset tar shard."""
    mask_prob: float = 0.15
    """Fraction of real (non-special) tokens chosen for the MLM loss."""
    mask_token_prob: float = 0.8
    """Of the chosen tokens, the fraction replaced by [MASK]."""
    random_token_prob: float = 0.1
    """Of the chosen tokens, the fraction replaced by a random non-special token (rest unchanged)."""
    masking: Literal["token", "whole_word"] = "token"
    """What MLM masking chooses: ``token`` picks single tokens; ``whole_word`` picks whole sentencepiece
    words (a piece starting with "\u2581" plus the pieces after it) until mask_prob of the real tokens are
    covered; the 80/10/10 rule then applies per token."""
    max_ngram: int = 1
    """With ``masking: whole_word``, the longest span of consecutive words chosen at once: lengths
    1..max_ngram are drawn with probability proportional to 1/length (1 = single words)."""
    order: Literal["global", "stream"] = "global"
    """How the train loader orders samples. ``global``: the sample at global position p of the run is a
    fixed function of (train.seed, p): a seeded permutation of every (shard, index) per epoch, read with
    random access (``wids`` indexed tars; remote shards are downloaded once into data.cache_dir); each
    global batch is cut into per-rank micro batches, so the order and the resume point do not depend on
    the data-parallel size or num_workers. ``stream``: each rank reads contiguous shard ranges
    sequentially with a shuffle buffer (no random access needed, e.g. shards that are only streamable);
    its order depends on the data-parallel size and num_workers (see data.resume)."""
    resume: Literal["exact", "approximate"] = "exact"
    """With ``order: stream``, resuming on another data-parallel size or num_workers stops with an error
    (the remaining samples would differ); ``approximate`` continues at the same epoch position instead.
    ``order: global`` always resumes exactly."""
    open_shards: int = 256
    """With ``order: global``, indexed shards each loader process keeps open (an LRU; each holds a file
    descriptor and a read-only mmap)."""
    cache_dir: str = ""
    """With ``order: global``, where remote shards are downloaded to (verified against manifest.json's
    sha256 once, then read locally); empty = ``$BERTFORGE_CACHE_DIR/shards``, by default
    ~/.cache/bertforge/shards."""
    shuffle_buffer: int = 2000
    """Samples held in the seeded shuffle buffer of the train loader (``order: stream``)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    prepare_workers: int = 0
    """Processes for corpus gathering and tokenization; 0 = one per CPU core."""
    prepare_bucket_mb: float = 128.0
    """Memory bound of data preparation, in MB of text: the corpus is streamed into on-disk buckets of
    about this size (by a hash of each document), and one bucket at a time is held, shuffled and sharded.
    Does not change the shards, only how many buckets (and how much memory) it takes."""
    shard_url_prefix: str = ""
    """Where the train/val shards are read from, when not next to manifest.json in data_dir: a directory,
    an http(s) URL or a ``pipe:`` command (anything ``webdataset.gopen`` opens); ``{name}`` stands for
    the shard's file name (``pipe:aws s3 cp s3://bucket/data/{name} -``), else the name is appended
    after a ``/``. Empty = data_dir (itself a local directory or an http(s) URL)."""
    on_checksum_mismatch: Literal["error", "skip"] = "error"
    """A local shard whose size or sha256 differs from manifest.json: ``error`` stops with a one-line
    message; ``skip`` trains without its samples, counted in data/corrupt_samples_skipped."""
    blend: list = field(default_factory=list)
    """Corpus blending for training: a list of ``{data_dir: <prepared dir>, weight: <number >= 0>}``
    (empty = off: train on data_dir alone). Samples are drawn from the dirs in proportion to the weights
    (normalized by their sum) by a fixed interleave schedule; each dir keeps its own shuffled epochs.
    Every dir must be prepared with the tokenizer of data_dir (same sha256), which stays the model's
    vocabulary and the validation set (validation does not blend)."""


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation, checkpointing and logging cadence."""

    run_dir: str = "runs/demo"
    """Directory of this run: config.yaml, checkpoints/, tb/ (TensorBoard), logs."""
    steps: int = 1000
    """Optimizer steps to train for (global, across resumes)."""
    micro_batch_size: int = 16
    """Sequences per rank per forward/backward."""
    gradient_accumulation_steps: int = 1
    """Micro batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all data-parallel ranks, as a check: when set (> 0) a launch is
    refused unless micro_batch_size x gradient_accumulation_steps x data-parallel size equals it
    (0 = whatever that product is)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to lr."""
    lr_decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape of the decay from lr to min_lr after warm-up."""
    lr_decay_steps: int = 0
    """Step at which the decay reaches min_lr (Megatron's --lr-decay-iters); 0 = train.steps. Set it
    to the original train.steps when a run is extended by raising train.steps on resume, so the
    steps already taken keep their learning rates."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.98
    """AdamW beta2."""
    adam_eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the fp32 master weights and the AdamW state in CPU memory and run the optimizer
    step there (ZeRO stage 1-3), trading step time for GPU memory. The step is torch's AdamW on the CPU,
    not DeepSpeedCPUAdam (whose C++ op JIT-compiles on first use)."""
    bf16: bool = False
    """Train in bf16 (DeepSpeed bf16 mode); fp32 otherwise."""
    seed: int = 1234
    """Seed of the model init, dropout and the data order."""
    log_every: int = 10
    """Steps between log lines and TensorBoard train scalars."""
    eval_every: int = 100
    """Steps between validation passes (and one at the end)."""
    eval_batches: int = 20
    """Micro batches per rank in a validation pass (0 = the whole val split)."""
    save_every: int = 500
    """Steps between checkpoints (and one at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints kept in run_dir/checkpoints (older ones are deleted)."""
    resume: bool = True
    """Resume from the latest checkpoint in run_dir when there is one."""
    exit_after_minutes: float = 0.0
    """Wall-clock budget of each training process, in minutes from its start (0 = none). When it is
    spent, all ranks save a checkpoint, write run_dir/status.json ``{"state": "preempted"}`` and exit 0,
    as for a stop signal; set it a few minutes below the job's time limit."""
    max_nan_skips: int = 5
    """A step whose loss or gradient norm is not finite (on any rank) is skipped: no weight update,
    counted in train/skipped_steps. After this many skipped steps in a row, ``train.nan_policy`` acts."""
    nan_policy: Literal["stop", "rollback"] = "stop"
    """After train.max_nan_skips consecutive skipped steps: ``stop`` ends the run with state failed and
    a one-line message; ``rollback`` reloads the last complete checkpoint on all ranks and goes on with
    the batches after the offending ones (stopping if that happens twice without a checkpoint between)."""
    load_universal: bool = False
    """Resume through DeepSpeed's universal checkpoint format (``<tag>_universal``, converted with
    ``python -m deepspeed.checkpoint.ds_to_universal`` when missing). Needed to resume with a different
    data-parallel size (ZeRO 1 or 2, no tensor parallelism); the data order after such a change is
    approximate (same epoch position, not the same remaining samples)."""


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (megatron-core); must divide the world size and the head count."""


@dataclass
class DeepSpeedConfig:
    """Extra DeepSpeed settings merged over the derived DeepSpeed config."""

    extra: dict = field(default_factory=dict)
    """Pass-through keys merged last into the generated DeepSpeed config (expert use)."""


@dataclass
class FinetuneConfig:
    """Sequence classification after pretraining (``python -m pretrain.finetune --run RUN_DIR``).

    The model and tokenizer come from the pretraining run; this section holds the task and the
    fine-tuning hyper-parameters only.
    """

    task_name: str = ""
    """Name of the task (output folder and logs); empty = the train file's folder name."""
    train_file: str = ""
    """Training examples: a local .tsv, .csv or .jsonl file (GLUE layout), read with ``datasets``."""
    validation_file: str = ""
    """Examples scored after every epoch and at the end (same columns as the train file)."""
    test_file: str = ""
    """Optional examples scored once at the end; without a label column, predictions are written."""
    file_format: Literal["auto", "tsv", "csv", "jsonl"] = "auto"
    """Format of the task files; auto = from the file extension (.tsv, .csv, .json/.jsonl)."""
    column_names: list = field(default_factory=list)
    """Column names of header-less TSV/CSV files (e.g. CoLA); empty = the first row is the header."""
    text_column: str = "sentence"
    """Column holding the (first) sentence."""
    text_pair_column: str = ""
    """Column holding the second sentence of sentence-pair tasks; empty = single-sentence task."""
    label_column: str = "label"
    """Column holding the class label."""
    labels: list = field(default_factory=list)
    """The label set in class-index order (values compared as strings); empty = the sorted distinct
    labels of the train file. Labels outside the set in any file are an error."""
    init: Literal["pretrained", "random"] = "pretrained"
    """Start from the run's checkpoint, or from random weights of the same shape (a baseline)."""
    checkpoint_tag: str = ""
    """Checkpoint of the run to start from (e.g. global_step600); empty = the newest complete one."""
    tokenizer: str = ""
    """Tokenizer model; empty = the run's ``<data.data_dir>/tokenizer.model``. Must be the tokenizer the
    checkpoint was pretrained with."""
    max_seq_len: int = 0
    """Tokens per example after truncation, [CLS] and [SEP]s included; 0 = model.max_position_embeddings."""
    epochs: int = 3
    """Passes over the train file."""
    max_steps: int = 0
    """Cap on optimizer steps; 0 = epochs * steps per epoch."""
    micro_batch_size: int = 32
    """Examples per rank per optimizer step."""
    lr: float = 5.0e-5
    """Peak learning rate (AdamW), linearly warmed up then linearly decayed to 0."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent warming up."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and norms)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 = off)."""
    classifier_dropout: float = 0.1
    """Dropout before the classification layer."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage of the fine-tuning run (0-3)."""
    bf16: bool = False
    """bf16 mixed precision (fp32 master weights)."""
    eval_every: int = 0
    """Evaluate on the validation file every N optimizer steps; 0 = after every epoch."""
    log_every: int = 10
    """Optimizer steps between train-loss log lines and TensorBoard points."""
    seed: int = 42
    """Seed of the classifier initialisation, the example order and dropout."""
    output_dir: str = ""
    """Where results.json, the TensorBoard events (tb/) and predictions go; empty =
    ``<run_dir>/finetune/<task_name>`` (``..._random`` for init=random)."""
    save_checkpoint: bool = False
    """Also save the fine-tuned model as a DeepSpeed checkpoint under ``<output_dir>/checkpoints``."""


@dataclass
class ExperimentConfig:
    """The whole run: one section per concern."""

    name: str = "bertforge"
    """Name of the experiment (shown in logs and TensorBoard hparams)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape and attention."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer, shards and masking."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and cadence."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor parallelism."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed pass-through."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Sequence-classification fine-tuning after pretraining (pretrain.finetune)."""

    def validate(self, world_size: int | None = None) -> ExperimentConfig:
        """Check cross-field rules; raise ConfigError with one line naming the key."""
        m, d, t, p = self.model, self.data, self.train, self.parallel
        _positive(self, ["model.num_layers", "model.hidden_size", "model.num_attention_heads",
                         "model.max_position_embeddings", "data.vocab_size", "data.seq_len",
                         "data.samples_per_shard", "train.steps", "train.micro_batch_size",
                         "train.gradient_accumulation_steps", "train.log_every", "train.eval_every",
                         "train.keep_last", "parallel.tensor_model_parallel_size"])
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                              f"model.num_attention_heads={m.num_attention_heads}; pick a head count that divides it")
        if m.max_position_embeddings < d.seq_len:
            raise ConfigError(f"model.max_position_embeddings={m.max_position_embeddings} < data.seq_len={d.seq_len}; "
                              "raise model.max_position_embeddings")
        if d.seq_len < 8:
            raise ConfigError(f"data.seq_len={d.seq_len} is too short; use at least 8")
        if d.vocab_size < 16:
            raise ConfigError(f"data.vocab_size={d.vocab_size} is too small; use at least 16")
        for key in ("mask_prob", "mask_token_prob", "random_token_prob", "val_fraction",
                    "hidden_dropout", "attention_dropout"):
            sec = d if hasattr(d, key) else m
            v = getattr(sec, key)
            if not 0.0 <= v < 1.0:
                name = ("data." if sec is d else "model.") + key
                raise ConfigError(f"{name}={v} must be in [0, 1)")
        if d.mask_token_prob + d.random_token_prob > 1.0:
            raise ConfigError("data.mask_token_prob + data.random_token_prob must be <= 1 "
                              f"(got {d.mask_token_prob} + {d.random_token_prob})")
        if d.max_ngram < 1:
            raise ConfigError(f"data.max_ngram={d.max_ngram} must be an integer >= 1 (1 = single words)")
        if d.max_ngram > 1 and d.masking != "whole_word":
            raise ConfigError(f"data.max_ngram={d.max_ngram} needs data.masking=whole_word "
                              f"(got {d.masking!r}); valid choices of data.masking: token, whole_word")
        if d.mask_prob <= 0:
            raise ConfigError("data.mask_prob must be > 0: the MLM loss needs masked tokens")
        if d.open_shards < 1:
            raise ConfigError(f"data.open_shards={d.open_shards} must be >= 1 (indexed shards kept open per process)")
        if d.shard_url_prefix.replace("{name}", "").count("{") or d.shard_url_prefix.count("{name}") > 1:
            raise ConfigError(f"data.shard_url_prefix={d.shard_url_prefix!r}: the only placeholder allowed is "
                              "one {name} (the shard's file name)")
        _validate_blend(d.blend)
        if t.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={t.zero_stage} is invalid; valid choices: 0, 1, 2, 3")
        if t.offload_optimizer and t.zero_stage == 0:
            raise ConfigError("train.offload_optimizer=true needs ZeRO: set train.zero_stage to 1, 2 or 3")
        if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
            raise ConfigError(f"train.lr={t.lr} / train.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0")
        if t.warmup_steps < 0 or t.save_every < 0 or t.eval_batches < 0 or t.lr_decay_steps < 0:
            raise ConfigError("train.warmup_steps, train.lr_decay_steps, train.save_every and train.eval_batches "
                              "must be >= 0")
        if t.exit_after_minutes < 0:
            raise ConfigError(f"train.exit_after_minutes={t.exit_after_minutes} must be >= 0 (0 = no budget)")
        if t.max_nan_skips < 1:
            raise ConfigError(f"train.max_nan_skips={t.max_nan_skips} must be a positive integer")
        tp = p.tensor_model_parallel_size
        if m.num_attention_heads % tp:
            raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                              f"parallel.tensor_model_parallel_size={tp}")
        if world_size is not None and world_size % tp:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size={tp}; "
                              "launch a multiple of the TP degree or lower it")
        if t.global_batch_size < 0:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be >= 0 (0 = derived)")
        if t.global_batch_size and world_size is not None:
            dp = world_size // tp
            got = t.micro_batch_size * t.gradient_accumulation_steps * dp
            if got != t.global_batch_size:
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} but train.micro_batch_size={t.micro_batch_size} x "
                    f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} x {dp} data-parallel rank(s) "
                    f"= {got}; set train.gradient_accumulation_steps="
                    f"{t.global_batch_size / (t.micro_batch_size * dp):g} or change the batch sizes")
        if not isinstance(m.attention, dict) or "name" not in m.attention:
            raise ConfigError("model.attention must be a mapping with a 'name' key, e.g. {name: softmax}")
        if m.layer_attention and isinstance(m.layer_attention, list):
            for i, rule in enumerate(m.layer_attention):
                if rule is not None and not isinstance(rule, dict):
                    raise ConfigError(f"model.layer_attention[{i}] must be a mapping or null, got {rule!r}")
        self._validate_finetune()
        return self

    def _validate_finetune(self) -> None:
        f = self.finetune
        _positive(self, ["finetune.epochs", "finetune.micro_batch_size", "finetune.log_every"])
        if f.max_steps < 0 or f.eval_every < 0:
            raise ConfigError("finetune.max_steps and finetune.eval_every must be >= 0")
        if f.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"finetune.zero_stage={f.zero_stage} is invalid; valid choices: 0, 1, 2, 3")
        if f.lr <= 0:
            raise ConfigError(f"finetune.lr={f.lr} must be > 0")
        for key in ("warmup_ratio", "classifier_dropout"):
            if not 0.0 <= getattr(f, key) < 1.0:
                raise ConfigError(f"finetune.{key}={getattr(f, key)} must be in [0, 1)")
        if f.weight_decay < 0 or f.grad_clip < 0:
            raise ConfigError("finetune.weight_decay and finetune.grad_clip must be >= 0")
        if f.max_seq_len and not 3 <= f.max_seq_len <= self.model.max_position_embeddings:
            raise ConfigError(f"finetune.max_seq_len={f.max_seq_len} must be in [3, model.max_position_embeddings="
                              f"{self.model.max_position_embeddings}] (0 = all positions)")

    def model_shape(self) -> dict[str, Any]:
        """The settings that shape the model's parameters, by dotted key (a checkpoint stores them so a
        resume with other values can name what differs)."""
        shape = {f"model.{k}": getattr(self.model, k) for k in _MODEL_SHAPE_KEYS}
        shape["data.vocab_size"] = self.data.vocab_size
        shape["parallel.tensor_model_parallel_size"] = self.parallel.tensor_model_parallel_size
        return json.loads(json.dumps(shape, default=str))  # plain JSON values (lists, not tuples)

    def model_shape_hash(self) -> str:
        """Hash of :meth:`model_shape` (used to refuse bad resumes)."""
        keys = {k.split(".", 1)[1]: v for k, v in self.model_shape().items() if k.startswith("model.")}
        keys["data.vocab_size"] = self.data.vocab_size
        keys["tp"] = self.parallel.tensor_model_parallel_size
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def optimizer_settings(self) -> dict[str, Any]:
        """Optimizer, schedule and batch settings by dotted key: a resume may change them (and logs it)."""
        return {f"train.{k}": getattr(self.train, k) for k in _OPTIMIZER_KEYS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str) -> None:
        """Write the resolved config as YAML (atomically)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)


_MODEL_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "max_position_embeddings", "vocab_size", "attention", "layer_attention")
_OPTIMIZER_KEYS = ("lr", "min_lr", "warmup_steps", "lr_decay", "weight_decay", "adam_beta1", "adam_beta2",
                   "adam_eps", "grad_clip", "steps", "zero_stage", "bf16", "micro_batch_size",
                   "gradient_accumulation_steps")


def _positive(cfg: ExperimentConfig, keys: list[str]) -> None:
    for key in keys:
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v <= 0:
            raise ConfigError(f"{key}={v} must be a positive integer")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


BLEND_KEYS = ("data_dir", "weight")


def _validate_blend(blend: list) -> None:
    """``data.blend``: mappings with a non-empty data_dir and a finite weight >= 0, not all zero."""
    for i, entry in enumerate(blend):
        key = f"data.blend[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}={entry!r} must be a mapping {{data_dir: <dir>, weight: <number>}}")
        unknown = [k for k in entry if k not in BLEND_KEYS]
        if unknown:
            raise ConfigError(f"unknown config key '{key}.{unknown[0]}'; valid keys under {key}: "
                              f"{', '.join(BLEND_KEYS)}")
        missing = [k for k in BLEND_KEYS if k not in entry]
        if missing:
            raise ConfigError(f"{key} has no {missing[0]}; give both {', '.join(BLEND_KEYS)}")
        if not isinstance(entry["data_dir"], str) or not entry["data_dir"]:
            raise ConfigError(f"{key}.data_dir={entry['data_dir']!r} must be a non-empty string (a prepared dir)")
        try:  # numbers, and strings like "1e-3", as for any float field
            w = entry["weight"] = _coerce(f"{key}.weight", entry["weight"], float)
        except ConfigError:
            w = None
        if w is None or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{key}.weight={entry['weight']!r} must be a finite number >= 0")
    if blend and not any(e["weight"] > 0 for e in blend):
        raise ConfigError("data.blend weights are all zero; give at least one dataset a weight > 0")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float etc.)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is invalid; valid choices: {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if tp is list or origin is list:
        if isinstance(value, (str, dict)) and key.endswith("corpus"):
            return [value] if isinstance(value, str) else value
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}={value!r} must be a list")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}={value!r} must be a mapping")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with the valid ones listed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("attention",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config inheritance loop: {' -> '.join(seen + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}; pass an existing YAML, e.g. --config configs/demo.yaml")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    parents = data.pop("inherit", None)
    if parents is None:
        return data
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        ppath = parent if os.path.isabs(parent) else os.path.join(os.path.dirname(path), parent)
        merged = _deep_merge(merged, _read_yaml(ppath, seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.num_layers=4`` -> (["model", "num_layers"], 4); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. model.num_layers=4)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {} if nxt is None else dict(nxt) if isinstance(nxt, dict) else {}
            else:
                nxt = dict(nxt)
            node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> ExperimentConfig:
    """Defaults < YAML (with ``inherit:``) < dotted overrides, then validate.

    Raises:
        ConfigError: one line naming the offending key and what would be valid.
    """
    data = _read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = _build(ExperimentConfig, data, "")
    cfg.validate(world_size)
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass (``python -m launch.config`` prints them)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def main() -> None:  # pragma: no cover - convenience
    """Print every config field with its default and docstring."""
    import sys

    for sec_field in dataclasses.fields(ExperimentConfig):
        cls = typing.get_type_hints(ExperimentConfig)[sec_field.name]
        if not dataclasses.is_dataclass(cls):
            continue
        sys.stdout.write(f"{sec_field.name}:\n")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            sys.stdout.write(f"  {f.name} = {default!r}\n      {docs.get(f.name, '')}\n")


if __name__ == "__main__":  # pragma: no cover
    main()
