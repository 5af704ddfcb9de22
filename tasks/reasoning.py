"""Commonsense and arithmetic reasoning for causal LMs (paper Table 2 / Table 14): instruction data, prompts,
response-only labels, length-grouped batches, and generation-ready evaluation batches.

Datasets (``DATASETS``; every hub id is a default, override it with ``hub_ids``, or give local
JSON/JSONL/CSV/parquet files with ``data_files``):

    commonsense  boolq piqa siqa hellaswag winogrande arc-e arc-c openbookqa
    math         multiarith gsm8k addsub singleeq svamp aqua mawps
    merged sets  commonsense_170k math_10k  (LLM-Adapters JSON: instruction, input, output, answer)

A row of a dataset in its hub schema (``boolq``: question/answer, ``piqa``: goal/sol1/sol2/label, ...) is
turned into the instruction schema ``{instruction, input, output, answer}`` that the merged sets use, so a
local file may be in either schema (a row with an ``instruction`` field is taken as it is). The
instructions follow LLM-Adapters (Hu et al. 2023), which commonsense_170k / math_10k were built with, so a
model fine-tuned on those sets answers in the format the evaluation parses ("answer2", "true", a number).

Prompts: ``TEMPLATES`` (``alpaca``, the default, and ``plain``). Training rows are ``prompt + output + eos``
with the loss on the response only (labels -100 on the prompt) unless ``train_on_inputs``. Evaluation rows
are the prompt alone, left-padded for batched generation, with the gold ``answer`` carried beside the
tensors for scoring: the prompt is built from ``instruction`` and ``input`` only, never from ``output``
(a rationale that ends in the answer) or ``answer``. The reference code put the gold rationale in its math
evaluation prompts; ``tests/test_reasoning.py`` checks that this cannot happen here.

Batches: training batches are grouped by length (``group_by_length``: shuffle, cut into mega-batches of
``mega_batch_factor`` x batch_size rows, sort each by length, cut into batches, shuffle the batches), which
removes most padding; the sampler shards itself across ranks (each rank gets its share of every global
batch), and Lightning leaves it alone under DDP / FSDP. Evaluation loaders get Lightning's
DistributedSampler, which repeats a few rows to even out the ranks: evaluate on one process for exact counts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from rocoft_pl.extras import require_extra
from rocoft_pl.preflight import PreflightError, offline_note, skipped

IGNORE_INDEX = -100
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ANSWER_TYPES = ("bool", "choice", "letter", "number")

TEMPLATES = {
    # LLM-Adapters / Alpaca: what commonsense_170k and math_10k models are trained with.
    "alpaca": {
        "with_input": (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        "no_input": (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    },
    "plain": {"with_input": "{instruction}\n{input}\nAnswer: ", "no_input": "{instruction}\nAnswer: "},
}


def build_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt shown to the model: instruction (and input), ending where the response begins."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    parts = TEMPLATES[template]
    if input and str(input).strip():
        return parts["with_input"].format(instruction=instruction, input=input)
    return parts["no_input"].format(instruction=instruction)


# -- dataset schemas -> instruction rows -------------------------------------------------------------------
def _options(word: str, texts: list[str]) -> tuple[str, str]:
    body = "".join(f"\n\n{word.capitalize()}{i}: {t}" for i, t in enumerate(texts, 1))
    fmt = "/".join(f"{word}{i}" for i in range(1, len(texts) + 1))
    return body, f"\n\nAnswer format: {fmt}"


def _choice_row(head: str, word: str, texts: list[str], gold: int) -> dict[str, str]:
    """gold: 1-based option number."""
    body, fmt = _options(word, texts)
    answer = f"{word}{gold}"
    return {"instruction": head + body + fmt, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _boolq(r: dict[str, Any]) -> dict[str, str]:
    answer = str(r["answer"]).strip().lower()
    answer = "true" if answer in ("true", "1", "yes") else "false"
    q = str(r["question"]).strip().rstrip("?")
    return {
        "instruction": f"Please answer the following question with true or false, question: {q}?\n\nAnswer format: true/false",
        "input": "", "output": f"the correct answer is {answer}", "answer": answer,
    }


def _piqa(r: dict[str, Any]) -> dict[str, str]:
    return _choice_row(f"Please choose the correct solution to the question: {r['goal']}", "solution",
                       [r["sol1"], r["sol2"]], int(r["label"]) + 1)


def _siqa(r: dict[str, Any]) -> dict[str, str]:
    return _choice_row(f"Please choose the correct answer to the question: {r['context']} {r['question']}", "answer",
                       [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]))  # labels are "1".."3"


def _hellaswag(r: dict[str, Any]) -> dict[str, str]:
    ctx = r.get("ctx") or f"{r.get('ctx_a', '')} {str(r.get('ctx_b', '')).capitalize()}".strip()
    head = f"Please choose the correct ending to complete the given sentence: {r['activity_label']}: {ctx}"
    return _choice_row(head, "ending", list(r["endings"]), int(r["label"]) + 1)


def _winogrande(r: dict[str, Any]) -> dict[str, str]:
    head = f"Please choose the correct answer to fill in the blank to complete the given sentence: {r['sentence']}"
    return _choice_row(head, "option", [r["option1"], r["option2"]], int(r["answer"]))


def _arc_like(question_field: str) -> Callable[[dict[str, Any]], dict[str, str]]:
    def convert(r: dict[str, Any]) -> dict[str, str]:
        labels = [str(l) for l in r["choices"]["label"]]
        gold = labels.index(str(r["answerKey"])) + 1
        return _choice_row(f"Please choose the correct answer to the question: {r[question_field]}", "answer",
                           list(r["choices"]["text"]), gold)

    return convert


def _number_text(value: Any) -> str:
    x = float(str(value).replace(",", ""))
    return str(int(x)) if x == int(x) else f"{x:.10g}"  # 10 digits: 12345.67 stays within the 1e-3 tolerance


def _math(question: Callable[[dict[str, Any]], str], answer: Callable[[dict[str, Any]], Any],
          rationale: Optional[Callable[[dict[str, Any]], str]] = None) -> Callable[[dict[str, Any]], dict[str, str]]:
    def convert(r: dict[str, Any]) -> dict[str, str]:
        gold = _number_text(answer(r))
        why = rationale(r).strip() + "\n" if rationale is not None else ""
        return {"instruction": question(r).strip(), "input": "", "output": f"{why}The answer is {gold}", "answer": gold}

    return convert


def _gsm8k_answer(r: dict[str, Any]) -> str:
    return str(r["answer"]).split("####")[-1].strip()


def _gsm8k_rationale(r: dict[str, Any]) -> str:
    return re.sub(r"<<[^>]*>>", "", str(r["answer"]).split("####")[0])


# MAWPS (Koncel-Kedziorski et al. 2016) comes in several schemas; (question field, answer fields), tried in
# order. LLM-Adapters' dataset/mawps/test.json is in the instruction schema and needs no converter.
MAWPS_SCHEMAS = (
    ("question", ("result_float", "result")),  # MU-NLPC/Calc-mawps (the hub default)
    ("sQuestion", ("lSolutions",)),  # the MAWPS repository's JSON (as AddSub / SingleEq)
    ("Question", ("Answer",)),  # the SVAMP repository's cv_mawps CSV: numberN placeholders filled from Numbers
)


def _mawps(r: dict[str, Any]) -> dict[str, str]:
    q_field, a_fields = next(((q, a) for q, a in MAWPS_SCHEMAS if q in r), (None, ()))
    if q_field is None:
        raise ValueError(f"missing question field: a MAWPS row needs one of "
                         f"{', '.join(q for q, _ in MAWPS_SCHEMAS)} (or instruction)")
    a_field = next((a for a in a_fields if r.get(a) is not None), None)
    if a_field is None:
        raise ValueError(f"missing answer field {' or '.join(a_fields)} (a MAWPS row with {q_field})")
    question = f"{r.get('Body') or ''} {r[q_field]}".strip()
    if r.get("Numbers") is not None:
        numbers = str(r["Numbers"]).split()
        question = re.sub(r"number(\d+)", lambda m: _number_text(numbers[int(m.group(1))]), question)
    answer = r[a_field][0] if isinstance(r[a_field], (list, tuple)) else r[a_field]
    return _math(lambda _: question, lambda _: answer)(r)


def _aqua(r: dict[str, Any]) -> dict[str, str]:
    options = " ".join(f"({o[0]}) {o[2:] if o[1:2] == ')' else o[1:]}".strip() for o in r["options"])
    gold = str(r["correct"]).strip()
    return {
        "instruction": f"{str(r['question']).strip()} Answer Choices: {options}", "input": "",
        "output": f"{str(r.get('rationale', '')).strip()}\nThe answer is {gold}", "answer": gold,
    }


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how its rows become instruction rows.

    hub_id / hub_config: ``datasets.load_dataset(hub_id, hub_config)``; None: local files only.
    train_split / eval_split: split names (eval: the split the paper's numbers use).
    convert: hub-schema row -> {instruction, input, output, answer}; rows already in that schema are kept.
    answer_type: how answers are extracted and compared (see rocoft_pl.modules.causal_lm.extract_answer).
    max_new_tokens: a sensible generation budget (choice answers are short, math needs a rationale).
    """

    family: str
    hub_id: Optional[str]
    hub_config: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    convert: Optional[Callable[[dict[str, Any]], dict[str, str]]] = None
    answer_type: str = "choice"
    max_new_tokens: int = 32


DATASETS: dict[str, DatasetSpec] = {
    "boolq": DatasetSpec("commonsense", "google/boolq", eval_split="validation", convert=_boolq, answer_type="bool"),
    "piqa": DatasetSpec("commonsense", "ybisk/piqa", eval_split="validation", convert=_piqa),
    "siqa": DatasetSpec("commonsense", "allenai/social_i_qa", eval_split="validation", convert=_siqa),
    "hellaswag": DatasetSpec("commonsense", "Rowan/hellaswag", eval_split="validation", convert=_hellaswag),
    "winogrande": DatasetSpec("commonsense", "allenai/winogrande", "winogrande_xl", eval_split="validation", convert=_winogrande),
    "arc-e": DatasetSpec("commonsense", "allenai/ai2_arc", "ARC-Easy", convert=_arc_like("question")),
    "arc-c": DatasetSpec("commonsense", "allenai/ai2_arc", "ARC-Challenge", convert=_arc_like("question")),
    "openbookqa": DatasetSpec("commonsense", "allenai/openbookqa", "main", convert=_arc_like("question_stem")),
    "gsm8k": DatasetSpec("math", "openai/gsm8k", "main", convert=_math(lambda r: r["question"], _gsm8k_answer, _gsm8k_rationale),
                         answer_type="number", max_new_tokens=256),
    "multiarith": DatasetSpec("math", "ChilleD/MultiArith", convert=_math(lambda r: r["question"], lambda r: r["final_ans"]),
                              answer_type="number", max_new_tokens=256),
    "svamp": DatasetSpec("math", "ChilleD/SVAMP", convert=_math(lambda r: f"{r['Body']} {r['Question']}", lambda r: r["Answer"]),
                         answer_type="number", max_new_tokens=256),
    # AddSub and SingleEq have no canonical hub copy: LLM-Adapters ships them as dataset/<Name>/test.json in
    # the instruction schema; pass those files (or a hub id of a copy in the ``sQuestion``/``lSolutions`` schema).
    "addsub": DatasetSpec("math", None, convert=_math(lambda r: r["sQuestion"], lambda r: r["lSolutions"][0]),
                          answer_type="number", max_new_tokens=256),
    "singleeq": DatasetSpec("math", None, convert=_math(lambda r: r["sQuestion"], lambda r: r["lSolutions"][0]),
                            answer_type="number", max_new_tokens=256),
    "aqua": DatasetSpec("math", "deepmind/aqua_rat", "raw", convert=_aqua, answer_type="letter", max_new_tokens=256),
    # MAWPS: not one of the paper's Table 2 sets (LLM-Adapters reports it). Hub default MU-NLPC/Calc-mawps
    # (question, result_float; train / validation / test, 520 test rows per its card: not checked offline);
    # LLM-Adapters' dataset/mawps/test.json (238 rows, instruction schema) as data_files; see MAWPS_SCHEMAS.
    "mawps": DatasetSpec("math", "MU-NLPC/Calc-mawps", convert=_mawps, answer_type="number", max_new_tokens=256),
    # Merged instruction sets (LLM-Adapters ft-training_set/*.json; community hub copies below).
    "commonsense_170k": DatasetSpec("commonsense", "zwhe99/commonsense_170k", eval_split="train", answer_type="choice"),
    "math_10k": DatasetSpec("math", "zwhe99/math_10k", eval_split="train", answer_type="number", max_new_tokens=256),
}
COMMONSENSE = tuple(n for n, s in DATASETS.items() if s.family == "commonsense" and s.convert is not None)
MATH = tuple(n for n, s in DATASETS.items() if s.family == "math" and s.convert is not None)


def infer_answer_type(answer: str, default: str) -> str:
    """Per-row answer type for merged sets (commonsense_170k mixes true/false and option answers)."""
    a = str(answer).strip().lower()
    if a in ("true", "false"):
        return "bool"
    if re.fullmatch(r"(answer|solution|ending|option)\d+", a):
        return "choice"
    if re.fullmatch(r"[a-e]", a):
        return "letter"
    if re.fullmatch(r"-?[\d,]*\.?\d+", a):
        return "number"
    return default


def to_instruction_row(name: str, row: dict[str, Any]) -> dict[str, str]:
    """One raw row (hub schema or instruction schema) as {instruction, input, output, answer, answer_type}."""
    spec = DATASETS.get(name)
    if "instruction" in row:
        out = {"instruction": str(row["instruction"]), "input": str(row.get("input") or ""),
               "output": str(row.get("output") or ""), "answer": str(row.get("answer") if row.get("answer") is not None else "")}
        if not out["answer"] and out["output"]:
            out["answer"] = out["output"].strip().split()[-1].rstrip(".") if out["output"].strip() else ""
    elif spec is not None and spec.convert is not None:
        out = spec.convert(row)
    else:
        raise ValueError(f"{name}: a row without an 'instruction' field and no converter for this dataset; "
                         f"its fields are {sorted(row)}")
    out["answer_type"] = infer_answer_type(out["answer"], spec.answer_type if spec else "number")
    return out


# -- sampling ------------------------------------------------------------------------------------------------
class LengthGroupedSampler(DistributedSampler):
    """Indices ordered so that consecutive ``batch_size`` rows have similar lengths (random otherwise).

    Shuffle, cut into mega-batches of ``mega_batch_factor * batch_size * num_replicas`` rows, sort each by
    length (longest first), cut into global batches, shuffle their order (the longest batch first, so an
    out-of-memory error shows at step 0), and give rank r the rows r, r + world, ... of every global batch.
    Deterministic per (seed, epoch); call ``set_epoch``. It is a DistributedSampler (already sharded), so
    Lightning neither replaces nor re-shards it under DDP / FSDP. ``resume_at`` continues an epoch after the
    global batches a mid-epoch checkpoint had trained (the DataModule's state in Lightning checkpoints).
    """

    def __init__(self, lengths: list[int], batch_size: int, mega_batch_factor: int = 50, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:  # no super().__init__: needs no process group
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError("batch_size and mega_batch_factor must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.lengths, self.batch_size, self.factor = list(lengths), batch_size, mega_batch_factor
        self.seed, self.epoch, self.num_replicas, self.rank = seed, 0, num_replicas, rank
        self.dataset, self.shuffle, self.drop_last = self.lengths, True, num_replicas > 1
        self.resumed: Optional[tuple[int, int]] = None  # (epoch, global batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start at epoch ``epoch``'s global batch ``batches``: Lightning restarts a plain DataLoader at the
        epoch's first batch, which would train those batches twice and never reach the epoch's last ones.
        ``len()`` stays the whole epoch (Lightning counts the trained batches itself); later epochs are whole.
        An epoch already finished resumes at the next one."""
        if batches < 0:
            raise ValueError(f"batches must be >= 0, got {batches}")
        if batches >= -(-len(self) // self.batch_size):  # every batch of that epoch was trained
            epoch, batches = epoch + 1, 0
        self.epoch, self.resumed = epoch, (epoch, batches)

    def global_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        global_bs = self.batch_size * self.num_replicas
        usable = len(order) - len(order) % global_bs if self.num_replicas > 1 else len(order)
        order = order[:usable]  # equal work per rank (the tail that cannot fill a global batch is dropped)
        mega = global_bs * self.factor
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + global_bs] for i in range(0, len(chunk), global_bs)]
        if len(batches) > 1:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
            rest = batches[1:]
            rng.shuffle(rest)
            batches = [batches[0], *rest]
        return batches

    def __iter__(self) -> Iterator[int]:
        batches = self.global_batches()
        if self.resumed is not None and self.resumed[0] == self.epoch:
            batches = batches[self.resumed[1]:]
        for batch in batches:
            yield from batch[self.rank::self.num_replicas]

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return len(self.lengths)
        global_bs = self.batch_size * self.num_replicas
        return (len(self.lengths) // global_bs) * self.batch_size


# -- the DataModule ------------------------------------------------------------------------------------------
class ReasoningDataModule(pl.LightningDataModule):
    """Instruction tuning on reasoning data; evaluation by generation on one or more test sets.

    Args:
        tokenizer_name_or_path: the model's tokenizer (the ``rocoft`` CLI links it to the model's path).
        train_datasets: names whose training rows are concatenated (e.g. ``[commonsense_170k]``, or
            ``[boolq, piqa]``); empty: no training data (evaluation only).
        eval_datasets: names evaluated one by one (per-dataset accuracy; ``val/<name>/accuracy``).
        data_files: per name, a file (its rows serve both training and evaluation) or ``{train: F,
            test: F}`` (split name -> file). Names given here are read locally, others from the hub.
        hub_ids: per name, ``{path: ..., name: ..., train_split: ..., eval_split: ...}`` overriding DATASETS.
        template: prompt template (``alpaca`` or ``plain``).
        train_on_inputs: loss on the prompt tokens too (default: response only).
        max_length: training rows are truncated to this many tokens (prompt + response).
        max_prompt_length: evaluation prompts are truncated from the left to this many tokens.
        batch_size / eval_batch_size: per device.
        group_by_length: length-grouped training batches (see LengthGroupedSampler); else plain shuffling.
        max_train_samples: a seeded sample of the concatenated training rows.
        max_eval_samples: per evaluation dataset, the first N rows (deterministic, comparable across runs).
        val_fraction: hold out this fraction of the training rows as an extra evaluation set named ``heldout``
            (only when ``eval_datasets`` is empty).
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (e.g. ``gguf_file``).

    Preflight: construction fails with one ``PreflightError`` listing every dataset that cannot be read (a
    missing local file, an unknown name, no hub copy, and then the hub datasets that are not reachable either);
    ``preflight()`` (run by ``prepare_data`` / ``setup``, and by the ``rocoft`` CLI before the model loads) checks
    the hub datasets: in the datasets cache, or, online, readable with this token. No rows are read.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        train_datasets: Optional[list[str]] = None,
        eval_datasets: Optional[list[str]] = None,
        data_files: Optional[dict[str, Union[str, dict[str, str]]]] = None,
        hub_ids: Optional[dict[str, dict[str, Any]]] = None,
        template: str = "alpaca",
        train_on_inputs: bool = False,
        max_length: int = 256,
        max_prompt_length: int = 512,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        group_by_length: bool = True,
        mega_batch_factor: int = 50,
        num_workers: int = 0,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        val_fraction: Optional[float] = None,
        tokenizer_kwargs: Optional[dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.train_datasets = list(train_datasets or [])
        self.eval_datasets = list(eval_datasets or [])
        self.data_files = {k: (str(v) if isinstance(v, (str, Path)) else {s: str(f) for s, f in v.items()})
                           for k, v in (data_files or {}).items()}
        self.hub_ids = dict(hub_ids or {})
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
        if not self.train_datasets and not self.eval_datasets:
            raise ValueError("give train_datasets and/or eval_datasets")
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, files in self.data_files.items():
            for path in ([files] if isinstance(files, str) else files.values()):
                if Path(path).suffix.lower() not in LOCAL_FORMATS:
                    raise ValueError(f"data_files[{name!r}]: {path}: use one of {sorted(LOCAL_FORMATS)}")
        self.tokenizer_name_or_path = str(tokenizer_name_or_path)
        self.template, self.train_on_inputs = template, train_on_inputs
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.group_by_length, self.mega_batch_factor = group_by_length, mega_batch_factor
        self.num_workers, self.seed = num_workers, seed
        self.max_train_samples, self.max_eval_samples, self.val_fraction = max_train_samples, max_eval_samples, val_fraction
        self.tokenizer_kwargs, self.cache_dir = dict(tokenizer_kwargs or {}), cache_dir
        self._tokenizer: Any = None
        self._preflight_passed = False
        self.train_rows: Optional[list[dict[str, Any]]] = None
        self.eval_rows: Optional[dict[str, list[dict[str, Any]]]] = None
        self._resume_at: Optional[tuple[int, int]] = None  # from a checkpoint: (epoch, batches trained in it)
        self._train_sampler: Optional[LengthGroupedSampler] = None
        unusable = self._unusable()
        if unusable:  # with the hub datasets that cannot be reached either: every problem in one error
            raise self._preflight_error(unusable + ([] if skipped() else self.preflight_problems()))

    # -- what the model needs ---------------------------------------------------------------------------
    @property
    def num_labels(self) -> None:
        """None: generation has no label count (the ``rocoft`` CLI links this into every model)."""
        return None

    @property
    def val_names(self) -> list[str]:
        if self.eval_datasets:
            return list(self.eval_datasets)
        return ["heldout"] if self.val_fraction else []

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **self.tokenizer_kwargs)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
            self._tokenizer = tok
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    def max_new_tokens(self, name: str) -> int:
        spec = DATASETS.get(name)
        return spec.max_new_tokens if spec else 256

    # -- loading ---------------------------------------------------------------------------------------
    def _hub(self, name: str) -> tuple[Optional[str], Optional[str], str, str]:
        spec = DATASETS.get(name, DatasetSpec("custom", None))
        o = self.hub_ids.get(name, {})
        return (o.get("path", spec.hub_id), o.get("name", spec.hub_config),
                o.get("train_split", spec.train_split), o.get("eval_split", spec.eval_split))

    def _source(self, name: str, purpose: str) -> tuple[Optional[dict[str, str]], str]:
        """Where ``name``'s rows for ``purpose`` ('train' or 'eval') come from: ``(files, split)``, the local
        data_files by split (None: the hub, ``_hub``) and the split to read."""
        _path, _config, train_split, eval_split = self._hub(name)
        split = train_split if purpose == "train" else eval_split
        if name not in self.data_files:
            return None, split
        files = self.data_files[name]
        if isinstance(files, str):
            files = {split: files}
        if split not in files:
            if len(files) != 1:
                raise ValueError(f"data_files[{name!r}] has no split {split!r} (have {sorted(files)})")
            split = next(iter(files))
        return files, split

    def raw_rows(self, name: str, purpose: str) -> list[dict[str, Any]]:
        """The raw rows of ``name`` for ``purpose`` ('train' or 'eval')."""
        datasets = require_extra("datasets", "tasks")

        files, split = self._source(name, purpose)
        if files is not None:
            builder = LOCAL_FORMATS[Path(next(iter(files.values()))).suffix.lower()]
            ds = datasets.load_dataset(builder, data_files=files, cache_dir=self.cache_dir)[split]
        else:
            path, config, _train, _eval = self._hub(name)
            ds = datasets.load_dataset(path, config, split=split, cache_dir=self.cache_dir)
        if len(ds) == 0:
            raise ValueError(f"{name} ({purpose}): no rows")
        return [dict(r) for r in ds]

    def source_of(self, name: str, purpose: str) -> str:
        """Where ``raw_rows(name, purpose)`` reads from: the local file, or the hub id and split."""
        files, split = self._source(name, purpose)
        if files is not None:
            return files[split]
        path, config, _train, _eval = self._hub(name)
        return f"hub {path}" + (f" ({config})" if config else "") + f", split {split}"

    def instruction_rows(self, name: str, purpose: str) -> list[dict[str, Any]]:
        """``raw_rows`` as instruction rows (with ``dataset``); a row that cannot be converted raises a
        ValueError naming the file (or hub id), the row and the missing field."""
        rows = []
        for i, raw in enumerate(self.raw_rows(name, purpose)):
            try:
                rows.append({**to_instruction_row(name, raw), "dataset": name})
            except (KeyError, IndexError, TypeError, ValueError) as e:
                why = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{name}: {self.source_of(name, purpose)}: row {i + 1}: {why}; "
                                 f"the row's fields are {sorted(raw)}") from e
        return rows

    # -- preflight -------------------------------------------------------------------------------------
    def _unusable(self) -> list[str]:
        """Datasets no configuration can load: local files that do not exist, unknown names, and names
        without a hub copy or data_files (checked on construction: they need no hub to tell)."""
        problems = []
        for name in dict.fromkeys([*self.train_datasets, *self.eval_datasets, *self.data_files]):
            files = self.data_files.get(name)
            if files is not None:
                problems += [f"dataset {name}: data_files: no such file {path}"
                             for path in ([files] if isinstance(files, str) else files.values()) if not Path(path).is_file()]
            elif name not in DATASETS:
                problems.append(f"dataset {name}: unknown dataset; give data_files for it, or use one of {sorted(DATASETS)}")
            elif self._hub(name)[0] is None:
                problems.append(f"dataset {name}: no hub copy; give data_files (e.g. LLM-Adapters dataset/{name}/test.json)")
        return problems

    def preflight_problems(self) -> list[str]:
        """One line per dataset that cannot be loaded (local files given but without the split the run reads;
        a hub copy neither in the datasets cache nor, online, downloadable), each with the ``data_files`` entry
        that replaces it. No rows are read."""
        from .preflight import dataset_problem

        problems: list[str] = []
        hub_splits: dict[str, list[str]] = {}
        for purpose, names in (("train", self.train_datasets), ("eval", self.eval_datasets)):
            for name in names:
                try:
                    files, split = self._source(name, purpose)
                except ValueError as err:
                    problems.append(f"dataset {name}: {err}")
                    continue
                if files is None and self._hub(name)[0] is not None and split not in hub_splits.setdefault(name, []):
                    hub_splits[name].append(split)
        for name, splits in hub_splits.items():
            path, config, _train, _eval = self._hub(name)
            problem = dataset_problem(name, str(path), config, splits, self.cache_dir)
            if problem:
                problems.append(problem)
        return list(dict.fromkeys(problems))

    def preflight(self) -> None:
        """Raise one ``PreflightError`` naming every dataset of the run that cannot be loaded, before any is.

        Called by ``prepare_data`` and ``setup`` (it passes once per instance) and by the ``rocoft`` CLI before
        the model loads; ``ROCOFT_NO_PREFLIGHT=1`` skips it. The local ``data_files`` were checked on
        construction.
        """
        if self._preflight_passed or skipped():
            return
        problems = self.preflight_problems()
        if problems:
            raise self._preflight_error(problems)
        self._preflight_passed = True

    def _preflight_error(self, problems: list[str]) -> PreflightError:
        """One error for all problems; when several datasets need local copies, the single data_files override
        that gives all of them (a second ``--data.init_args.data_files`` would replace the first)."""
        from .preflight import data_files_hint, datasets_offline

        names = [n for n in dict.fromkeys([*self.train_datasets, *self.eval_datasets, *self.data_files])
                 if any(p.startswith(f"dataset {n}: ") for p in problems)]
        notes = []
        if len(names) > 1:
            kept = {n: f for n, f in self.data_files.items() if n not in names}
            notes.append(f"All at once (data_files on the command line replaces the config's): {data_files_hint(names, kept)}")
        if any("(offline)" in p for p in problems) and datasets_offline():
            notes.append(offline_note())
        return PreflightError(problems, notes)

    def prepare_data(self) -> None:
        self.preflight()
        for name in {*self.train_datasets, *self.eval_datasets} - set(self.data_files):
            self.raw_rows(name, "train" if name in self.train_datasets else "eval")

    def setup(self, stage: Optional[str] = None) -> None:
        self._resume_at = None  # a new run; Lightning restores a checkpoint's position after setup
        if self.train_rows is not None:
            return
        self.preflight()
        train: list[dict[str, Any]] = []
        for name in self.train_datasets:
            train += self.instruction_rows(name, "train")
        rng = random.Random(self.seed)
        evals: dict[str, list[dict[str, Any]]] = {}
        if self.val_fraction and not self.eval_datasets and train:
            rng.shuffle(train)
            n = max(1, int(len(train) * self.val_fraction))
            evals["heldout"], train = train[:n], train[n:]
        if self.max_train_samples is not None and self.max_train_samples < len(train):
            train = random.Random(self.seed).sample(train, self.max_train_samples)
        for name in self.eval_datasets:
            rows = self.instruction_rows(name, "eval")
            evals[name] = rows[: self.max_eval_samples] if self.max_eval_samples else rows
        encoded = [self.encode_train(r) for r in train]
        self.train_rows = [e for e in encoded if any(l != IGNORE_INDEX for l in e["labels"])]
        if len(self.train_rows) < len(encoded):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{len(encoded) - len(self.train_rows)} of {len(encoded)} training rows dropped: their "
                           f"prompt fills max_length={self.max_length}, no response token is left to learn from")
        self.eval_rows = {n: [self.encode_eval(r) for r in rows] for n, rows in evals.items()}

    # -- encoding --------------------------------------------------------------------------------------
    def prompt_of(self, row: dict[str, Any]) -> str:
        """The prompt: from the instruction and input only (never the output or the answer)."""
        return build_prompt(row["instruction"], row.get("input", ""), self.template)

    def encode_train(self, row: dict[str, Any]) -> dict[str, Any]:
        tok = self.tokenizer
        prompt_ids = tok(self.prompt_of(row), add_special_tokens=True)["input_ids"]
        response_ids = tok(row["output"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            response_ids = response_ids + [tok.eos_token_id]
        ids = (prompt_ids + response_ids)[: self.max_length]
        labels = list(ids) if self.train_on_inputs else ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: self.max_length]
        return {"input_ids": ids, "labels": labels}

    def encode_eval(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = self.prompt_of(row)
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = ids[-self.max_prompt_length:]  # keep the end: the question and "### Response:"
        return {"input_ids": ids, "prompt": prompt, "answer": row["answer"], "answer_type": row["answer_type"],
                "dataset": row["dataset"]}

    # -- collation -------------------------------------------------------------------------------------
    def collate_train(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right padding; labels -100 on padding."""
        pad = self.tokenizer.pad_token_id
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def collate_eval(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Left padding (generation continues every row from its last real token); the gold answers travel
        beside the tensors and are never part of ``input_ids``."""
        pad = self.tokenizer.pad_token_id
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, n - k:], mask[i, n - k:] = torch.tensor(r["input_ids"]), 1
        return {"input_ids": ids, "attention_mask": mask, "answer": [r["answer"] for r in rows],
                "answer_type": [r["answer_type"] for r in rows], "dataset": [r["dataset"] for r in rows]}

    # -- loaders ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self.train_rows is None:
            raise RuntimeError("call setup() first")
        if not self.train_rows:
            raise ValueError("no training data: give train_datasets")
        sampler: Optional[Sampler[int]] = None
        if self.group_by_length:
            trainer = getattr(self, "trainer", None)
            world = trainer.world_size if trainer is not None else 1
            rank = trainer.global_rank if trainer is not None else 0
            sampler = LengthGroupedSampler([len(r["input_ids"]) for r in self.train_rows], self.batch_size,
                                           self.mega_batch_factor, self.seed, world, rank)
            if trainer is not None:
                sampler.set_epoch(trainer.current_epoch)
            if self._resume_at is not None:
                sampler.resume_at(*self._resume_at)
            self._train_sampler = sampler
        return DataLoader(self.train_rows, batch_size=self.batch_size, sampler=sampler,
                          shuffle=sampler is None, collate_fn=self.collate_train, num_workers=self.num_workers)

    # -- resuming -------------------------------------------------------------------------------------
    def _global_batch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return self.batch_size * (trainer.world_size if trainer is not None else 1)

    def state_dict(self) -> dict[str, int]:
        """Saved in Lightning checkpoints: the training epoch and how many of its batches were trained, so that
        resuming from a mid-epoch checkpoint continues with the next unseen batch (LengthGroupedSampler)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": trained, "global_batch": self._global_batch()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Lightning restores this after ``setup`` and before it asks for the training loader (single device,
        DDP) or after (sharded strategies: the latest sampler is told): either way the sampler starts at the
        first untrained batch. Exact with ``group_by_length`` only (plain shuffling restarts the epoch in
        another order), and with the same rows per batch over all devices (another global batch orders the
        epoch differently: a warning, and the rest of the epoch is drawn from its start, as Lightning does with
        a plain DataLoader)."""
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

        if "epoch" not in state_dict:
            return
        saved, now = state_dict.get("global_batch", self._global_batch()), self._global_batch()
        if saved != now:
            rank_zero_warn(f"ReasoningDataModule: the checkpoint was trained with {saved} rows per batch over all "
                           f"devices, this run has {now}: its batch order differs, so the rest of the interrupted "
                           "epoch is drawn from the epoch's start (some rows twice, others not at all)")
            return
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))
        if self._train_sampler is not None:
            self._train_sampler.resume_at(*self._resume_at)
        if self.group_by_length and self._resume_at[1]:
            epoch, batches = self._resume_at
            rank_zero_info(f"ReasoningDataModule: resuming epoch {epoch} after its first {batches} batches (they are "
                           "skipped; Lightning's warning that the dataloader is not resumable does not apply to the "
                           "length-grouped sampler)")

    def _eval_loader(self, name: str) -> DataLoader:
        assert self.eval_rows is not None
        return DataLoader(self.eval_rows[name], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate_eval, num_workers=self.num_workers)

    def val_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        if self.eval_rows is None:
            raise RuntimeError("call setup() first")
        loaders = [self._eval_loader(n) for n in self.val_names]
        return loaders[0] if len(loaders) == 1 else loaders

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


# -- a synthetic arithmetic set (offline demos; MultiArith-like one- and two-step word problems) -------------
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo", "Nia")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "stamps")


def synthetic_arithmetic(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` invented word problems in the instruction schema (instruction, input, output with a short
    rationale, answer): add, subtract, multiply, and add-then-subtract. For demos and smoke runs on CPU; not a
    benchmark."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = rng.randrange(4)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if kind == 0:
            q, why, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", f"{a} + {b} = {a + b}", a + b
        elif kind == 1:
            a, b = max(a, b) + 1, min(a, b)
            q, why, ans = f"{name} had {a} {item} and gave away {b}. How many {item} are left?", f"{a} - {b} = {a - b}", a - b
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q, why, ans = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?", f"{a} * {b} = {a * b}", a * b
        else:
            c = rng.randint(1, a + b - 1)
            q = f"{name} had {a} {item}, found {b} more and then lost {c}. How many {item} does {name} have?"
            why, ans = f"{a} + {b} - {c} = {a + b - c}", a + b - c
        rows.append({"instruction": q, "input": "", "output": f"{why}.\nThe answer is {ans}", "answer": str(ans)})
    return rows


__all__ = [
    "ANSWER_TYPES", "COMMONSENSE", "DATASETS", "DatasetSpec", "IGNORE_INDEX", "LengthGroupedSampler", "MATH",
    "ReasoningDataModule", "TEMPLATES", "build_prompt", "synthetic_arithmetic", "infer_answer_type", "to_instruction_row",
]
