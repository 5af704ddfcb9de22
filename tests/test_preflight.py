"""The preflight (rocoft_pl.preflight, tasks.preflight, ReasoningDataModule.preflight): every model and dataset
that cannot be reached is named in one error, with how to point it at a local copy, before anything loads.

Offline by construction (tests/conftest.py sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and a temporary HF_HOME);
the online path is exercised against a mock HTTP transport, never the network.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import tiny_causal_lm as tl  # noqa: E402
from rocoft_pl.preflight import (  # noqa: E402
    MODEL_FLAG, PreflightError, collect, hub_access_problem, missing_model_files, model_problems,
)
from tasks.preflight import cached_splits, data_files_hint, dataset_problem  # noqa: E402
from tasks.reasoning import ReasoningDataModule  # noqa: E402


def test_offline_by_construction():
    import datasets.config
    from huggingface_hub import constants

    assert constants.is_offline_mode() and datasets.config.HF_HUB_OFFLINE


# -- datasets ---------------------------------------------------------------------------------------------------
def cache_hub_dataset(cache_dir: Path, repo_id: str, config: str, split: str, rows_file: str) -> None:
    """A prepared copy of hub dataset ``repo_id`` in the datasets cache, laid out as load_dataset leaves one
    (<namespace>___<name>/<config>/<version>/<hash>/ with dataset_info.json and <name>-<split>.arrow)."""
    from datasets.data_files import DataFilesDict
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    name = camelcase_to_snakecase(name)
    builder = Json(cache_dir=str(cache_dir), dataset_name=f"{namespace}___{name}", config_name=config,
                   config_id=config, hash="0123abcd", data_files=DataFilesDict.from_patterns({split: [rows_file]}))
    builder.download_and_prepare()
    for arrow in Path(builder.cache_dir).glob(f"{namespace}___{name}-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace(f"{namespace}___{name}", name)))


def no_loading(monkeypatch):
    """Fail the test if anything tries to read rows or weights."""
    import datasets
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"loaded {args[:1]} during the preflight")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    for auto in ("AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", refuse)


def test_every_uncached_hub_dataset_is_named_at_once_with_its_data_files_override(tmp_path, monkeypatch):
    no_loading(monkeypatch)
    dm = ReasoningDataModule("unused", train_datasets=["commonsense_170k"], eval_datasets=["boolq", "arc-e", "winogrande"],
                             data_files={"winogrande": tl.DATASET_FILES["winogrande"]}, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PreflightError) as info:
        dm.prepare_data()  # the preflight comes first: load_dataset is never called
    err = info.value
    assert len(err.problems) == 3, err.problems
    for name, hub in [("commonsense_170k", "zwhe99/commonsense_170k"), ("boolq", "google/boolq"),
                      ("arc-e", "allenai/ai2_arc (ARC-Easy)")]:
        (line,) = [p for p in err.problems if p.startswith(f"dataset {name}: ")]
        assert f"hub {hub} is not in the datasets cache {tmp_path / 'cache'}" in line, line
        assert f"--data.init_args.data_files '{{{name}: path/to/{name}.json}}'" in line, line
    assert not any("winogrande" in p for p in err.problems)  # read from its local file
    # one override for all of them, keeping the config's own entry (a command-line data_files replaces the dict)
    (together,) = [n for n in err.notes if n.startswith("All at once")]
    assert f"winogrande: {tl.DATASET_FILES['winogrande']}, commonsense_170k: path/to/commonsense_170k.json" in together
    assert any("HF_HOME=" in n for n in err.notes)
    assert str(err).startswith("3 inputs of this run cannot be reached") and "ROCOFT_NO_PREFLIGHT=1" in str(err)
    with pytest.raises(PreflightError):
        dm.setup("fit")  # setup checks too (a script may call it without prepare_data)


def test_construction_names_every_unusable_dataset_and_the_unreachable_hub_ones(tmp_path):
    with pytest.raises(PreflightError) as info:
        ReasoningDataModule("unused", eval_datasets=["addsub", "nope", "piqa", "singleeq", "gsm8k"],
                            data_files={"piqa": str(tmp_path / "piqa.jsonl")}, cache_dir=str(tmp_path))
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "dataset addsub", "dataset nope", "dataset piqa", "dataset singleeq", "dataset gsm8k"], problems
    assert "no hub copy" in problems[0] and "unknown dataset" in problems[1]
    assert f"no such file {tmp_path / 'piqa.jsonl'}" in problems[2]
    assert "hub openai/gsm8k (main) is not in the datasets cache" in problems[4]
    assert "gsm8k: path/to/gsm8k.json" in info.value.notes[0] and "piqa: path/to/piqa.json" in info.value.notes[0]


def test_local_fixture_files_pass_without_the_hub(monkeypatch):
    dm = ReasoningDataModule("unused", train_datasets=list(tl.MERGED_FILES), eval_datasets=list(tl.DATASET_FILES),
                             data_files={**tl.DATASET_FILES, **tl.MERGED_FILES})
    assert dm.preflight_problems() == []
    dm.preflight()
    dm.tokenizer = tl.tiny_tokenizer()
    dm.setup("fit")
    assert len(dm.eval_rows) == len(tl.DATASET_FILES)


def test_a_split_the_local_files_lack_is_named():
    with pytest.raises(PreflightError, match="dataset boolq: data_files\\['boolq'\\] has no split 'train'"):
        ReasoningDataModule("unused", train_datasets=["boolq"], data_files={
            "boolq": {"validation": tl.DATASET_FILES["boolq"], "test": tl.DATASET_FILES["boolq"]}}).preflight()


def test_a_cached_hub_dataset_passes_and_load_dataset_reads_it_offline(tmp_path):
    cache = tmp_path / "datasets"
    cache_hub_dataset(cache, "me/BoolQ-copy", "main", "validation", tl.DATASET_FILES["boolq"])
    assert cached_splits("me/BoolQ-copy", "main", str(cache)) == {"validation"}
    assert cached_splits("me/BoolQ-copy", "other", str(cache)) is None
    assert cached_splits("me/BoolQ-copy", None, str(cache)) == {"validation"}
    dm = ReasoningDataModule("unused", eval_datasets=["boolq"], cache_dir=str(cache),
                             hub_ids={"boolq": {"path": "me/BoolQ-copy", "name": "main"}})
    dm.preflight()
    assert len(dm.raw_rows("boolq", "eval")) == 3  # what the preflight accepted, datasets loads offline
    # the same copy, asked for a split it does not have
    line = dataset_problem("boolq", "me/BoolQ-copy", "main", ["train", "validation"], str(cache))
    assert line is not None and "without split train (has validation)" in line, line


# -- the model --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llm")
    tl.tiny_llama().save_pretrained(path)
    tl.tiny_tokenizer().save_pretrained(path)
    return path


def test_local_model_directories(tiny_llm_dir, tmp_path):
    assert model_problems(str(tiny_llm_dir)) == []
    (line,) = model_problems(str(tmp_path / "no_model"))
    assert f"no such directory {tmp_path / 'no_model'}" in line and MODEL_FLAG in line
    (line,) = model_problems("runs/not/here")  # a path, not a hub id: not looked up on the hub
    assert "no such directory runs/not/here" in line
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tiny_llm_dir / "config.json", half)
    assert missing_model_files(half) == (
        "has no weights (model.safetensors / pytorch_model.bin / model.safetensors.index.json), no tokenizer files "
        "(tokenizer.json, tokenizer_config.json, tokenizer.model ...)")
    shutil.copy(tiny_llm_dir / "tokenizer.json", half)
    (half / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (half / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert missing_model_files(half) == ("has no shards model-00002-of-00002.safetensors "
                                         "(listed in model.safetensors.index.json)")
    assert missing_model_files(half, gguf_file="m.gguf") == "has no m.gguf"
    (line,) = model_problems("pkg:no_such_model_package_here")
    assert "cannot import model package 'no_such_model_package_here'" in line and MODEL_FLAG in line


def fill_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """A snapshot of ``source`` in a hub cache, laid out as huggingface_hub leaves one (refs/main -> commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    shutil.copytree(source, repo / "snapshots" / "0123456789abcdef")


def test_hub_models_count_when_their_cached_snapshot_is_complete(tiny_llm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "hub"
    fill_hub_cache(cache, "me/tiny-llama", tiny_llm_dir)
    assert model_problems("me/tiny-llama", cache_dir=str(cache)) == []
    AutoModelForCausalLM.from_pretrained("me/tiny-llama", cache_dir=str(cache))  # what passed, loads offline
    (line,) = model_problems("meta-llama/Llama-2-7b-hf", cache_dir=str(cache))
    assert line.startswith(f"model meta-llama/Llama-2-7b-hf: hub id not in the Hugging Face cache {cache} (offline)")
    assert "hf download meta-llama/Llama-2-7b-hf" in line and MODEL_FLAG in line
    (cache / "models--me--tiny-llama" / "snapshots" / "0123456789abcdef" / "model.safetensors").unlink()
    (line,) = model_problems("me/tiny-llama", cache_dir=str(cache))
    assert "cached incompletely (has no weights" in line


# -- online, against a mock hub -----------------------------------------------------------------------------------
@pytest.fixture
def mock_hub(monkeypatch):
    """huggingface_hub's HTTP session answering auth-check like the hub: gated, missing, or granted."""
    import httpx2
    import huggingface_hub.utils

    asked = []

    def answer(request):
        asked.append(request.url.path)
        if "/gated/" in request.url.path:
            return httpx2.Response(403, headers={"X-Error-Code": "GatedRepo"}, request=request)
        if "/missing/" in request.url.path:
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=request)
        if "/down/" in request.url.path:
            raise httpx2.ConnectError("connection refused", request=request)
        return httpx2.Response(200, json={}, request=request)

    client = httpx2.Client(transport=httpx2.MockTransport(answer))
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: client)
    return asked


def test_online_the_hub_says_what_is_gated_missing_or_unreachable(mock_hub, tmp_path):
    assert hub_access_problem("org/open") is None
    assert "gated: accept its terms at https://huggingface.co/org/gated and set HF_TOKEN" in hub_access_problem("org/gated")
    assert "not found on the hub (https://huggingface.co/datasets/org/missing)" in hub_access_problem("org/missing", "dataset")
    assert "cannot reach the hub (ConnectError: connection refused)" in hub_access_problem("org/down")
    assert model_problems("org/open", cache_dir=str(tmp_path), offline=False) == []
    (line,) = model_problems("org/gated", cache_dir=str(tmp_path), offline=False)
    assert line.startswith("model org/gated: hub id not in the Hugging Face cache, gated") and MODEL_FLAG in line
    line = dataset_problem("boolq", "org/missing", None, ["validation"], str(tmp_path), offline=False)
    assert "dataset boolq: hub org/missing: not found on the hub" in line
    assert data_files_hint(["boolq"]) in line
    assert dataset_problem("boolq", "org/open", None, ["validation"], str(tmp_path), offline=False) is None
    assert mock_hub == ["/api/models/org/open/auth-check", "/api/models/org/gated/auth-check",
                        "/api/datasets/org/missing/auth-check", "/api/models/org/down/auth-check",
                        "/api/models/org/open/auth-check", "/api/models/org/gated/auth-check",
                        "/api/datasets/org/missing/auth-check", "/api/datasets/org/open/auth-check"]


def test_collect_gathers_every_check_and_skipping(monkeypatch):
    def bad_dm():
        raise PreflightError(["dataset a: x"], ["note"])

    def bad_value():
        raise FileNotFoundError("data_dir: no such directory /x")

    assert collect([lambda: ["model m: y"], bad_dm, bad_value, lambda: None]) == (
        ["model m: y", "dataset a: x", "data_dir: no such directory /x"], ["note"])
    dm = ReasoningDataModule("unused", eval_datasets=["boolq"])  # not cached: would fail
    monkeypatch.setenv("ROCOFT_NO_PREFLIGHT", "1")
    dm.preflight()
