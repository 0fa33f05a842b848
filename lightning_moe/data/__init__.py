"""Data: ``TextDataModule`` over Hugging Face ``datasets``, byte tokenisation, the built-in corpus."""

from lightning_moe.data.corpus import builtin_corpus_lines
from lightning_moe.data.datamodule import TextDataModule
from lightning_moe.data.loader import EpochShuffleSampler, ResumableDataLoader
from lightning_moe.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "ByteTokenizer", "EpochShuffleSampler", "HFTokenizer", "ResumableDataLoader", "TextDataModule",
    "builtin_corpus_lines",
]
