"""The built-in corpus: real English prose that ships with every CPython, so needs no download.

``pydoc_data.topics`` holds the Python language reference's topic pages that ``help()`` shows:
about 465,000 characters of technical English.
"""

from __future__ import annotations


def builtin_corpus_lines() -> list[str]:
    """The built-in corpus as lines (with their newlines), topics in sorted order."""
    from pydoc_data.topics import topics

    return [line for name in sorted(topics) for line in topics[name].splitlines(keepends=True)]
