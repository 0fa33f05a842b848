"""``predict`` generates text: prompts from the data module, MoELanguageModel.predict_step, GeneratedTextWriter."""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_moe.callbacks import GeneratedTextWriter
from lightning_moe.data import ByteTokenizer, TextDataModule
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel

PROMPTS = ["def ", "The with statement", "KING:"]


def tiny_model(**generate: object) -> MoELanguageModel:
    torch.manual_seed(0)
    return MoELanguageModel(max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                            moe=MoEConfig(num_experts=4, expert_d_ff=32), **{"generate_max_new_tokens": 6, **generate})


def predict(model: MoELanguageModel, dm: TextDataModule, *callbacks: L.Callback) -> list[dict[str, str]]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        devices=1, callbacks=list(callbacks))
    return trainer.predict(model, datamodule=dm)


class Latin1Tokenizer(ByteTokenizer):
    """Bytes, decoded one character per token: the length of a text is its number of tokens."""

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("latin-1")


def test_writer_saves_a_continuation_per_prompt_in_order(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         one_thread: None) -> None:
    path = tmp_path / "out" / "predictions.txt"
    out = predict(tiny_model(), TextDataModule(corpus="pydoc", seq_len=16, prompts=PROMPTS),
                  GeneratedTextWriter(path=str(path)))
    assert [row["prompt"] for row in out] == PROMPTS and all(row["text"] for row in out)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": row["prompt"], "text": row["text"]} for row in out]
    assert [row["index"] for row in out] == list(range(len(PROMPTS)))
    text = path.read_text()
    starts = [text.index(f"--- prompt {i} ---\n{p}\n--- continuation {i} ---\n{row['text']}\n")
              for i, (p, row) in enumerate(zip(PROMPTS, out, strict=True), start=1)]
    assert starts == sorted(starts) and starts[0] == 0
    printed = capsys.readouterr().out
    assert "--- prompt 3 ---\nKING:\n" in printed and f"Predictions written to {path}" in printed


def test_greedy_is_deterministic_and_writes_exactly_n_tokens(one_thread: None) -> None:
    dm = TextDataModule(corpus="pydoc", seq_len=16, prompts=PROMPTS)
    dm.tokenizer = Latin1Tokenizer()
    greedy = tiny_model(generate_temperature=0.0, generate_max_new_tokens=5)
    first, second = predict(greedy, dm), predict(greedy, dm)
    assert first == second and [len(row["text"]) for row in first] == [5, 5, 5]
    # A prompt longer than the context is cut to its last max_seq_len tokens by generate.
    long = TextDataModule(corpus="pydoc", seq_len=16, prompts=["x" * 40])
    long.tokenizer = Latin1Tokenizer()
    sampled = predict(tiny_model(generate_temperature=1.0, generate_top_k=None, generate_max_new_tokens=7), long)
    assert len(sampled[0]["text"]) == 7


def test_prompts_file_and_default_prompts(tmp_path: Path, one_thread: None) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("To be, or not\n\n   \nKING: \n")
    dm = TextDataModule(corpus="pydoc", seq_len=16, prompts_file=str(file))
    assert dm.prompts == ["To be, or not", "KING: "]
    assert [row["prompt"] for row in predict(tiny_model(), dm)] == dm.prompts
    # Without prompts: the first 64 tokens of the first 4 test blocks (here whole blocks of 17).
    default = TextDataModule(corpus="pydoc", seq_len=16)
    out = predict(tiny_model(), default)
    decode = ByteTokenizer().decode
    assert [row["prompt"] for row in out] == [decode(b.tolist()) for b in default.test_set[:4]["input_ids"]]
    batch = next(iter(TextDataModule(corpus="pydoc", prompts=["KING:"]).predict_dataloader()))
    assert batch["prompt"] == "KING:" and batch["input_ids"].tolist() == [list(b"KING:")]


def test_bad_prompts() -> None:
    with pytest.raises(FileNotFoundError, match="`prompts_file`: no such file .*nothere.txt"):
        TextDataModule(corpus="pydoc", prompts_file="nothere.txt")
    with pytest.raises(ValueError, match=r"`prompts`: prompt 1 \(''\) is empty"):
        TextDataModule(corpus="pydoc", prompts=["a", ""])
    with pytest.raises(ValueError, match="`prompts` or `prompts_file`, not both"):
        TextDataModule(corpus="pydoc", prompts=["a"], prompts_file="x.txt")
    dm = TextDataModule(corpus="pydoc", test_fraction=0.0)
    with pytest.raises(ValueError, match="`predict` needs the test split.*`test_fraction` is 0.*--data.prompts"):
        dm.setup("predict")


@pytest.mark.parametrize("kwargs, match", [
    ({"generate_max_new_tokens": 0}, "`generate_max_new_tokens` must be an integer >= 1, got 0"),
    ({"generate_temperature": -0.5}, "`generate_temperature` must be a number >= 0, got -0.5"),
    ({"generate_top_k": 0}, "`generate_top_k` must be an integer >= 1, got 0"),
])
def test_bad_generation_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)


def test_old_checkpoint_without_generation_settings_loads(tmp_path: Path) -> None:
    model = tiny_model()
    hparams = {k: v for k, v in model.hparams.items() if not k.startswith("generate_")}
    assert set(model.hparams) - set(hparams) == {"generate_max_new_tokens", "generate_temperature", "generate_top_k"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, path)
    loaded = MoELanguageModel.load_from_checkpoint(path)
    assert (loaded.generate_max_new_tokens, loaded.generate_temperature, loaded.generate_top_k) == (200, 0.8, 50)
    assert torch.equal(loaded.model.embed.weight, model.model.embed.weight)


def test_vocabulary_must_match_the_tokenizer() -> None:
    model = MoELanguageModel(vocab_size=300, max_seq_len=16, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                             generate_max_new_tokens=1, moe=MoEConfig(num_experts=2, expert_d_ff=32))
    with pytest.raises(ValueError, match="vocabulary of 256, the model 300"):
        model.predict_step({"prompt": "a", "input_ids": torch.tensor([[97]])}, 0)


def test_predict_through_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning_moe.cli import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-moe"])
    run_cli(["predict", "--config", str(Path(__file__).parents[1] / "cli_configs" / "tiny.yaml"),
             "--model.d_model", "32", "--model.n_layers", "1", "--model.max_seq_len", "16", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--data.corpus", "pydoc", "--data.prompts", '["def "]',
             "--model.generate_max_new_tokens", "8", "--trainer.default_root_dir", str(tmp_path / "root"),
             "--trainer.callbacks+=lightning_moe.callbacks.GeneratedTextWriter"])
    rows = [json.loads(line) for line in (tmp_path / "root" / "predictions.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["def "] and rows[0]["text"]
    assert (tmp_path / "root" / "predictions.txt").read_text().startswith("--- prompt 1 ---\ndef \n")


def test_prompts_are_padded_so_every_rank_runs_as_many_and_copies_are_written_once(tmp_path: Path) -> None:
    from types import SimpleNamespace

    dm = TextDataModule(corpus="pydoc", prompts=["a", "b", "c"])
    dm.trainer = SimpleNamespace(world_size=2)  # Lightning gives predict's ranks unrepeated shares: 2 and 1 here
    batches = list(dm.predict_dataloader())
    assert [(b["prompt"], b["index"]) for b in batches] == [("a", 0), ("b", 1), ("c", 2), ("a", 0)]
    writer = GeneratedTextWriter(path=str(tmp_path / "p.txt"), stdout=False)
    writer._rows = [(0, b["index"], b["prompt"], b["prompt"].upper()) for b in batches]
    assert [row[1:] for row in writer._gather(SimpleNamespace(world_size=1))] == [
        (0, "a", "A"), (1, "b", "B"), (2, "c", "C")]
