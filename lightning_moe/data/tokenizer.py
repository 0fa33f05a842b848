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
