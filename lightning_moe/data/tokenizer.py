"""Byte-level tokenisation: UTF-8 bytes are the tokens, so nothing is downloaded."""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """Tokens are the 256 byte values of the UTF-8 encoding."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (``AutoTokenizer.from_pretrained(name_or_path)``) with the
    :class:`ByteTokenizer` interface, for fine-tuning a pre-trained model on its own vocabulary.

    Text is encoded without special tokens (blocks are cut from one concatenated stream). A local
    directory needs no network; a hub name does, and the ``lightning-moe`` commands run offline
    unless ``HF_HUB_OFFLINE=0`` is set.
    """

    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError("`tokenizer` needs transformers: pip install -e '.[hf]'") from err
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as err:
            raise ValueError(f"`tokenizer`: cannot load a Hugging Face tokenizer from {name_or_path!r} "
                             f"({err}).") from err
        self.name_or_path = name_or_path
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])
