"""Errors raised by the data pipeline."""


class DataError(ValueError):
    """Bad or missing data (corpus, tokenizer, shards, manifest).

    The message is one line that says what is wrong and how to fix it.
    """
