"""Text -> sentencepiece tokenizer -> packed webdataset shards -> masked MLM batches.

Modules (import them directly; this package import stays light so worker processes start fast):

- ``corpus``     gather documents from .txt / .jsonl files, globs, or the embedded ``demo`` corpus
- ``tokenizer``  train and load the sentencepiece model with [PAD] [CLS] [SEP] [MASK] [UNK] = ids 0..4
- ``prepare``    corpus -> train/val split -> tokenizer -> packed shards + manifest.json (CLI)
- ``masking``    pure, seeded dynamic MLM masking (80/10/10)
- ``loader``     resumable, data-parallel-aware train/val loaders over the shards
"""

from data_pipeline.errors import DataError

__all__ = ["DataError"]
