"""Sentencepiece tokenizer with BERT's special tokens at fixed ids.

``[PAD]=0 [CLS]=1 [SEP]=2 [MASK]=3 [UNK]=4``; no BOS/EOS. [CLS], [SEP] and [MASK] are control
symbols: the literal text "[MASK]" in a document is tokenized as ordinary characters, never as the
mask token. Training is deterministic for a given text, vocabulary size, model type and thread
count (the model bytes, hence :attr:`Tokenizer.sha256`, do not depend on the output path).

    tok = train_tokenizer(docs, "data/demo/tokenizer", vocab_size=8192)
    tok = Tokenizer.load("data/demo/tokenizer.model")
    ids = tok.encode("Return the sum of a and b.")
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

PAD, CLS, SEP, MASK, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD, CLS, SEP, MASK, UNK)
"""Special pieces in id order: PAD=0, CLS=1, SEP=2, MASK=3, UNK=4."""
WORD_START = "\u2581"  # "▁", sentencepiece's marker of a preceding space
_MB = 1_000_000


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unit_hash(text: str, salt: str) -> float:
    """A stable number in [0, 1) derived from ``text`` (sha256, never Python's salted hash())."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def iter_lines(docs: Iterable[str]) -> Iterator[str]:
    """Non-empty stripped lines of ``docs`` (the unit the trainer reads)."""
    for d in docs:
        for line in d.splitlines():
            line = line.strip()
            if line:
                yield line


class Tokenizer:
    """A loaded sentencepiece model plus the ids the data pipeline needs."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise DataError(f"tokenizer model {model_path} does not exist; run "
                            "`python -m data_pipeline.prepare --config ...` first")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.sha256 = sha256_file(model_path)
        """Hex sha256 of the model file."""
        self.vocab_size = int(self.sp.get_piece_size())
        ids = [self.sp.piece_to_id(p) for p in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise DataError(f"tokenizer {model_path} has special ids {dict(zip(SPECIAL_TOKENS, ids))}, "
                            "expected PAD..UNK = 0..4; retrain it with data_pipeline.tokenizer.train_tokenizer")
        self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id = ids
        self.special_ids = frozenset(ids)
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._word_start = np.array([p.startswith(WORD_START) for p in pieces], dtype=bool)
        self._word_start[list(self.special_ids)] = False

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Load ``path`` (a ``.model`` file, or a prefix to which ``.model`` is appended)."""
        if not os.path.isfile(path) and os.path.isfile(path + ".model"):
            path += ".model"
        return cls(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Token ids of each text as int32 arrays (sentencepiece's threads, ``num_threads``)."""
        return self.sp.encode(texts, return_type="numpy", num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control tokens ([PAD] [CLS] [SEP] [MASK]) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def is_word_start(self, i: int) -> bool:
        """True if piece ``i`` begins a word (starts with ▁); special tokens are not word starts."""
        return bool(self._word_start[int(i)])

    @property
    def word_start_table(self) -> np.ndarray:
        """Bool array over the vocabulary: :meth:`is_word_start` of every id (for vectorized use)."""
        return self._word_start

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def sample_lines(texts: list[str], sample_mb: float, salt: str = "tokenizer-sample") -> list[str]:
    """Lines of about ``sample_mb`` MB of ``texts``: every document if they fit, else a stable
    hash-selected subset of documents spread over the whole corpus."""
    total = sum(len(t.encode()) for t in texts)
    budget = sample_mb * _MB
    if sample_mb <= 0 or total <= budget:
        chosen = texts
    else:
        frac = budget / total
        chosen = [t for t in texts if unit_hash(t, salt) < frac]
    return list(iter_lines(chosen))


def train_tokenizer(texts: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "unigram",
                    sample_mb: float = 16.0, num_threads: int = 0) -> Tokenizer:
    """Train a sentencepiece model on ``texts`` and write ``<model_prefix>.model`` (and ``.vocab``).

    Args:
        texts: documents; their lines are the training sentences.
        model_prefix: output path without extension.
        vocab_size: pieces in the vocabulary, the 5 special tokens included.
        model_type: ``unigram`` or ``bpe``.
        sample_mb: MB of text sampled (deterministically) for training; <= 0 uses everything.
        num_threads: trainer threads; 0 = one per CPU core.

    Raises:
        DataError: no text, or a vocabulary too large for the text.
    """
    texts = list(texts)
    lines = sample_lines(texts, sample_mb)
    if not lines:
        raise DataError("cannot train a tokenizer on an empty corpus; add text to data.corpus")
    threads = num_threads if num_threads > 0 else (os.cpu_count() or 1)
    t0 = time.perf_counter()
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, unk_id=4, bos_id=-1, eos_id=-1, pad_piece=PAD, unk_piece=UNK,
            control_symbols=[CLS, SEP, MASK], input_sentence_size=0, byte_fallback=False,
            split_digits=True, num_threads=threads, minloglevel=2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot train a {vocab_size}-piece {model_type} tokenizer on {len(lines)} lines "
                        f"({msg}); lower data.vocab_size or add text") from None
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    path = model_prefix + ".model"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    tok = Tokenizer(path)
    with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(tok.vocab_size):
            f.write(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i):g}\n")
    log.info("tokenizer: %s %d pieces trained on %d lines (%.1f MB) in %.1f s -> %s (sha256 %s)",
             model_type, tok.vocab_size, len(lines), sum(len(x) for x in lines) / _MB,
             time.perf_counter() - t0, path, tok.sha256[:12])
    return tok
