"""rocoft_pl.modules.causal_lm: answer extraction, response-only loss, left-padded batched generation, and
fit + generate-and-parse evaluation with RoCoFT on a tiny Llama and a tiny GPT-2 (Conv1D)."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import tiny_causal_lm as tl  # noqa: E402
from rocoft_pl import RoCoFT, rocoft_layers  # noqa: E402
from rocoft_pl.modules.causal_lm import CausalLMModule, answers_match, extract_answer  # noqa: E402
from tasks.reasoning import ReasoningDataModule  # noqa: E402


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("the correct answer is true", "bool", "true"),
        ("False. Because ...", "bool", "false"),
        ("Yes, it is", "bool", "true"),
        ("nothing here", "bool", None),
        ("the correct answer is answer2", "choice", "2"),
        ("Solution 1 is right", "choice", "1"),
        ("the correct answer is ending4", "choice", "4"),
        ("option2", "choice", "2"),
        ("(C) sunlight", "choice", "3"),
        ("The answer is (C).", "letter", "C"),
        ("so B looks best, but the answer is D", "letter", "D"),
        ("I pick (E)", "letter", "E"),
        ("no letter", "letter", None),
        ("3 + 4 = 7.\nThe answer is 7", "number", "7.0"),
        ("He pays $1,234.50 in total", "number", "1234.5"),
        ("1,000 * 5 = 5,000 meters", "number", "5000.0"),
        ("#### 72", "number", "72.0"),
        ("#### 59 + 22 = 81\nEli has 81 marbles now.", "number", "81.0"),
        ("The answer is 7. Then 3 more", "number", "7.0"),
        ("The answer is 3/4 of the cake", "number", "0.75"),
        ("a 50% discount", "number", "50.0"),
        ("-3 degrees", "number", "-3.0"),
        ("no digits", "number", None),
    ],
)
def test_extract_answer(text, kind, expected):
    assert extract_answer(text, kind) == expected


def test_answers_match_with_tolerance_and_gold_formats():
    assert answers_match(extract_answer("The answer is 5,000", "number"), "5000", "number")
    assert answers_match("7.0004", "7", "number") and not answers_match("7.01", "7", "number")
    assert answers_match(extract_answer("the correct answer is solution2", "choice"), "solution2", "choice")
    assert not answers_match("1", "solution2", "choice") and not answers_match(None, "true", "bool")
    assert answers_match("true", "true", "bool") and answers_match("B", "B", "letter")


def test_model_packages_resolve_without_a_working_import(tmp_path, monkeypatch):
    from rocoft_pl.modules.classification import resolve_pretrained

    pkg = tmp_path / "fake_model_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_pretrained("pkg:fake_model_pkg") == str(pkg)
    assert resolve_pretrained("some/hub-id") == "some/hub-id"


def datamodule(**kwargs):
    files = {**tl.DATASET_FILES, **tl.MERGED_FILES}
    kwargs.setdefault("train_datasets", ["commonsense_170k", "math_10k"])
    kwargs.setdefault("eval_datasets", ["boolq", "gsm8k", "aqua"])
    dm = ReasoningDataModule("unused", data_files=files, batch_size=4, eval_batch_size=3, max_length=160, **kwargs)
    dm.tokenizer = tl.tiny_tokenizer()
    return dm


def module(model, **kwargs):
    kwargs.setdefault("max_new_tokens", 4)
    kwargs.setdefault("warmup_steps", 0)
    return CausalLMModule(model=model, tokenizer=tl.tiny_tokenizer(), **kwargs)


def test_loss_is_the_mean_over_response_tokens():
    dm = datamodule()
    dm.setup("fit")
    batch = dm.collate_train(dm.train_rows[:3])
    m = module(tl.tiny_llama())
    loss = m.training_step(batch, 0)
    logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("factory", [tl.tiny_llama, tl.tiny_gpt2], ids=["llama", "gpt2"])
def test_left_padded_batch_generation_equals_one_by_one(factory):
    dm = datamodule(train_datasets=[], eval_datasets=["gsm8k"])
    dm.setup("validate")
    rows = dm.eval_rows["gsm8k"]
    m = module(factory())
    batch = dm.collate_eval(rows)
    assert batch["attention_mask"].eq(0).any()  # really padded
    together = m.generate(batch["input_ids"], batch["attention_mask"], 6)
    alone = [m.generate(torch.tensor([r["input_ids"]]), torch.ones(1, len(r["input_ids"]), dtype=torch.long), 6)[0] for r in rows]
    assert together == alone


def test_per_dataset_accuracy_from_generated_text():
    dm = datamodule(train_datasets=[])
    m = module(tl.tiny_llama())
    replies = {"boolq": ["true", "false", "false"], "gsm8k": ["The answer is 7", "12", "it is 5,000"], "aqua": ["(A)", "A", "E"]}

    def fake_generate(input_ids, attention_mask, max_new_tokens):
        name = fake_generate.current
        return replies[name][: input_ids.shape[0]]

    m.generate = fake_generate
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    original = m._evaluate

    def evaluate(batch, idx):  # route the fake replies by dataset
        fake_generate.current = batch["dataset"][0]
        return original(batch, idx)

    m._evaluate = evaluate
    metrics = trainer.validate(m, datamodule=dm, verbose=False)[0]
    assert metrics["val/boolq/accuracy"] == pytest.approx(2 / 3)  # gold: true false true
    assert metrics["val/gsm8k/accuracy"] == pytest.approx(1.0)  # gold: 7 12 5000
    assert metrics["val/aqua/accuracy"] == pytest.approx(2 / 3)  # gold: B A E
    assert metrics["val/accuracy"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


@pytest.mark.parametrize("factory", [tl.tiny_llama, tl.tiny_gpt2], ids=["llama", "gpt2"])
def test_rocoft_fit_then_generate_and_parse(factory, tmp_path):
    dm = datamodule()
    m = module(factory(), learning_rate=5e-2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    callback = RoCoFT(mode="row", rank=2, adapter_dir=str(tmp_path / "adapter"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(m, datamodule=dm)
    layers = rocoft_layers(m)
    assert len(layers) == (14 if factory is tl.tiny_llama else 8)  # Llama: 7 Linear/block; GPT-2: 4 Conv1D/block
    assert all(l.delta.abs().sum() > 0 for l in layers.values())
    after = {n.replace(".base.", "."): p for n, p in m.named_parameters() if not n.endswith(".delta")}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], p) for n, p in after.items())  # W0 and everything else frozen
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    metrics = trainer.validate(m, datamodule=dm, verbose=False)[0]
    assert {"val/boolq/accuracy", "val/gsm8k/accuracy", "val/aqua/accuracy", "val/accuracy"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.endswith("accuracy"))
    assert metrics["val/boolq/count"] == 3
    rows = trainer.predict(m, datamodule=dm)
    flat = [r for loader in rows for batch in loader for r in batch]
    assert {r["dataset"] for r in flat} == {"boolq", "gsm8k", "aqua"} and all("generated" in r for r in flat)


def test_model_from_a_saved_directory_and_meta_init(tmp_path):
    tl.tiny_llama().save_pretrained(tmp_path / "model")
    tl.tiny_tokenizer().save_pretrained(tmp_path / "model")
    eager = CausalLMModule(str(tmp_path / "model"))
    lazy = CausalLMModule(str(tmp_path / "model"), init_on_meta=True)
    assert lazy.model is None
    lazy.configure_model()
    for (n, a), (_, b) in zip(eager.model.state_dict().items(), lazy.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert eager.model.training and eager.tokenizer.pad_token == "<pad>"


def test_gradient_checkpointing_trains_and_generates():
    dm = datamodule()
    dm.setup("fit")
    m = module(tl.tiny_llama(), gradient_checkpointing=True)
    from rocoft_pl import RoCoFTConfig, apply_rocoft

    apply_rocoft(m.model, RoCoFTConfig(mode="column", rank=1))
    loss = m.training_step(dm.collate_train(dm.train_rows[:2]), 0)
    loss.backward()
    assert all(l.delta.grad is not None and l.delta.grad.abs().sum() > 0 for l in rocoft_layers(m).values())
    batch = dm.collate_eval(dm.eval_rows["gsm8k"])
    assert len(m.generate(batch["input_ids"], batch["attention_mask"], 3)) == 3
