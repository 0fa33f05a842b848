from pathlib import Path

import pytest
import torch

from lightning_moe.data import ByteTokenizer, EpochShuffleSampler, ResumableDataLoader, TextDataModule


def test_builtin_corpus_is_real_text() -> None:
    dm = TextDataModule(seq_len=64, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) > 5000 and len(dm.val_set) > 100
    batch = next(iter(dm.train_dataloader()))
    ids = batch["input_ids"]
    assert ids.shape == (4, 65) and ids.dtype == torch.int64
    text = ByteTokenizer().decode(dm.train_set[:100]["input_ids"].flatten().tolist())
    assert "statement" in text
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.7 * len(text)


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
