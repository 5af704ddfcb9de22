"""Seq2SeqModule: ROUGE equals rouge-score's, batched generation settings, timing, default targets, `rocoft fit`."""

from pathlib import Path

import pytest
import torch
import yaml

from rocoft_pl.modules.seq2seq import Seq2SeqModule, rouge_scores, split_sentences

ROOT = Path(__file__).parent.parent
FIX = ROOT / "tests" / "fixtures" / "summarization"
TINY = str(FIX / "tiny_bart")

PREDS = ["The cats were sitting on the mat. They slept.", "Police said the man was arrested", "", "A new game won"]
REFS = ["A cat sat on the mat.\nIt slept all day.", "The man was arrested, police said.", "Nothing here.", "Team won the new game!"]


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    ours = rouge_scores(PREDS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        assert ours[key] == pytest.approx(expected, abs=1e-12)
    # rougeLsum on newline-split sentences
    lsum = sum(scorer.score(split_sentences(r), split_sentences(p))["rougeLsum"].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
    assert ours["rougeLsum"] == pytest.approx(lsum, abs=1e-12)
    assert split_sentences("One. Two!  Three?\nFour") == "One.\nTwo!\nThree?\nFour"
    assert rouge_scores(["a b c"], ["a b c"]) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


def test_generation_settings_reach_generate(monkeypatch):
    module = Seq2SeqModule(TINY, num_beams=3, generation_max_length=9, generation_min_length=2, length_penalty=2.0, no_repeat_ngram_size=3)
    seen = {}
    original = module.model.generate

    def spy(**kw):
        seen.update(kw)
        return original(**kw)

    monkeypatch.setattr(module.model, "generate", spy)
    from transformers import AutoTokenizer

    module._tok = AutoTokenizer.from_pretrained(TINY)
    batch = module._tok(["the cat sat on the mat .", "dog ran"], return_tensors="pt", padding=True)
    texts = module.generate(dict(batch))
    assert len(texts) == 2 and seen["input_ids"].shape[0] == 2  # one generate call for the whole batch
    assert {k: seen[k] for k in ("num_beams", "max_length", "min_length", "length_penalty", "no_repeat_ngram_size")} == {
        "num_beams": 3, "max_length": 9, "min_length": 2, "length_penalty": 2.0, "no_repeat_ngram_size": 3}
    assert module._generation_seconds > 0
    with pytest.raises(ValueError, match="unknown rouge_keys"):
        Seq2SeqModule(TINY, rouge_keys=["rouge3"])


def test_default_targets_cover_bart_and_t5_self_cross_attention_and_ffn():
    from transformers import BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from rocoft_pl import RoCoFTConfig, apply_rocoft, rocoft_layers

    bart = BartForConditionalGeneration.from_pretrained(TINY)
    apply_rocoft(bart, RoCoFTConfig(rank=1))
    attn = ("q_proj", "k_proj", "v_proj", "out_proj")
    expected = [f"model.encoder.layers.0.self_attn.{p}" for p in attn] + ["model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2"]
    expected += [f"model.decoder.layers.0.{m}.{p}" for m in ("self_attn", "encoder_attn") for p in attn]
    expected += ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]
    assert sorted(rocoft_layers(bart)) == sorted(expected)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2))
    apply_rocoft(t5, RoCoFTConfig(rank=1))
    qkvo = ("q", "k", "v", "o")
    expected = [f"encoder.block.0.layer.0.SelfAttention.{p}" for p in qkvo] + [f"encoder.block.0.layer.1.DenseReluDense.{p}" for p in ("wi", "wo")]
    expected += [f"decoder.block.0.layer.0.SelfAttention.{p}" for p in qkvo] + [f"decoder.block.0.layer.1.EncDecAttention.{p}" for p in qkvo]
    expected += [f"decoder.block.0.layer.2.DenseReluDense.{p}" for p in ("wi", "wo")]
    assert sorted(rocoft_layers(t5)) == sorted(expected)
    assert not any("lm_head" in n or "shared" in n for n in rocoft_layers(t5))


@pytest.mark.parametrize(
    "arch,mode,rank,expected",
    [("deberta-v3-base", "row", 1, 82_944), ("deberta-v3-base", "row", 3, 248_832), ("bart-large", "row", 1, 270_336), ("bart-large", "row", 3, 811_008),
     ("bart-large", "column", 3, 811_008)],
)
def test_parameter_report_for_paper_models(arch, mode, rank, expected):
    """The README's table: counts of deberta-v3-base / bart-large shaped models built on the meta device."""
    from transformers import BartConfig, BartForConditionalGeneration, DebertaV2Config, DebertaV2ForQuestionAnswering

    from rocoft_pl import RoCoFTConfig, apply_rocoft

    with torch.device("meta"):
        if arch == "bart-large":
            model = BartForConditionalGeneration(BartConfig(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                                                            decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024))
        else:
            model = DebertaV2ForQuestionAnswering(DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                                  intermediate_size=3072, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
                                                                  max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                                                                  pos_att_type=["p2c", "c2p"], position_biased_input=False))
    report = apply_rocoft(model, RoCoFTConfig(mode=mode, rank=rank))
    assert report.rocoft_params == expected
    assert len(report.modules) == (72 if arch.startswith("deberta") else 192)
    assert report.head_params == (2 * 768 + 2 if arch.startswith("deberta") else 0)


def test_rocoft_fit_through_the_cli(tmp_path):
    from rocoft_pl.cli import RoCoFTCLI

    config = {
        "model": {"class_path": "rocoft_pl.modules.seq2seq.Seq2SeqModule",
                  "init_args": {"model_name_or_path": TINY, "learning_rate": 1e-2, "warmup_steps": 1, "num_beams": 2, "generation_max_length": 8, "save_predictions": True}},
        "data": {"class_path": "tasks.summarization.SummarizationDataModule",
                 "init_args": {"task": "xsum", "data_dir": str(FIX / "xsum"), "batch_size": 4, "max_source_length": 48, "max_target_length": 12}},
        "trainer": {
            "max_steps": 2, "val_check_interval": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "rocoft_pl.RoCoFT", "init_args": {"mode": "column", "rank": 1}}],
        },
    }
    path = tmp_path / "sum.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = RoCoFTCLI(args=["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for k in ("val/rouge1", "val/rouge2", "val/rougeL", "val/rougeLsum", "val/loss", "val/generation_seconds", "val/generation_share"):
        assert k in m, k
    assert 0 < m["val/generation_share"] <= 1 and 0 < m["time/generation_share_of_epoch"] <= 1
    assert len(cli.model.last_predictions) == 4
    import json

    rows = [json.loads(line) for line in (tmp_path / "predictions_val.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == [0, 1, 2, 3] and rows[0]["reference"] == cli.datamodule.references()[0]
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert {"test/rouge1", "test/rougeLsum", "test/generation_share"} <= set(tested)


@pytest.mark.parametrize("name", ["xsum.yaml", "cnn_dailymail.yaml"])
def test_summarization_configs_parse_with_table10_values(name, capsys):
    from rocoft_pl.cli import RoCoFTCLI

    with pytest.raises(SystemExit):
        RoCoFTCLI(args=["fit", "--config", str(ROOT / "configs" / "summarization" / name), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = printed["model"]["init_args"], printed["data"]["init_args"], printed["trainer"]
    assert (model["learning_rate"], trainer["max_epochs"], data["batch_size"], model["weight_decay"], model["warmup_steps"], model["scheduler"], model["dropout"]) == (
        1e-4, 4, 16, 0.01, 100, "cosine", 0.1)
    assert model["model_name_or_path"] == "facebook/bart-large" and data["task"] == name.split(".")[0]
    rocoft = trainer["callbacks"][-1]["init_args"]
    assert (rocoft["rank"], rocoft["train_bias"], rocoft["selection"]) == (3, True, "random")


def test_table7_grid_parses():
    from benchmark.grid import load_grid

    grid = load_grid(ROOT / "configs" / "bench" / "table7.yaml")
    assert len(grid.cells) == 4 * 5
    by_id = {c.cell_id.split("|", 1)[1]: c for c in grid.cells}
    assert {c.method for c in grid.cells} == {"full", "bitfit", "lora", "rocoft-row", "rocoft-column"}
    row = by_id["squad_v2|rocoft-row-r3|seed=0"]
    assert row.method_params == {"train_bias": True, "selection": "random", "rank": 3}
    assert row.config["model"]["class_path"].endswith("QuestionAnsweringModule") and row.config["data"]["init_args"]["version"] == "v2"
    assert row.config["model"]["init_args"]["learning_rate"] == 1e-4 and by_id["squad_v2|full|seed=0"].config["model"]["init_args"]["learning_rate"] == 2e-5
    xsum = by_id["xsum|rocoft-column-r3|seed=0"].config
    assert xsum["model"]["init_args"]["model_name_or_path"] == "facebook/bart-large" and xsum["model"]["init_args"]["weight_decay"] == 0.01
    assert by_id["cnn_dailymail|lora-r8|seed=0"].config["data"]["init_args"]["task"] == "cnn_dailymail"
    assert by_id["xsum|full|seed=0"].primary_metrics == ["val/rouge1", "val/rouge2", "val/rougeL"]
