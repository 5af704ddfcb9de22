"""The function f whose gradients define the NTK, one example at a time: ``f(model, example) -> (D,)``.

- ``MaskedLMOutput``: prompt-based f of Malladi et al. (2023) / LM-BFF: the masked-LM logits of the label
  words at the mask position of a template (SST-2: "<sentence> It was <mask> ." with terrible / great).
- ``ClassifierOutput``: the logits of a sequence-classification head.
- ``EmbeddingSimilarityOutput``: for sentence-embedding encoders without an MLM head (e.g. all-MiniLM-L6-v2):
  f_c(x) = <e(x), a_c> with e the normalised mean-pooled embedding and a_c the (fixed, detached) normalised
  embedding of the label word c: a zero-shot, prompt-like logit that is meaningful at the pretrained weights.

Outputs: with C classes f has D = C outputs and the kernel is matrix-valued, one block per class pair
K[i, a, j, b]. For two classes the default is the scalar logit difference f_1 - f_0 (D = 1), the binary
setting of Malladi et al.; pass ``binary_difference=False`` to keep both logits.

``encode_prompt`` builds the example: the template's ``{field}`` placeholders take the example's text
fields and ``{mask}`` the tokenizer's mask token; too-long inputs lose words from their longest field, so
the mask is never truncated away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _reduce(logits: torch.Tensor, binary_difference: bool) -> torch.Tensor:
    if binary_difference and logits.numel() == 2:
        return (logits[1] - logits[0]).reshape(1)
    return logits


def _transformed(t: torch.Tensor) -> bool:
    """True for a tensor inside a torch.func transform (vmap: data-dependent checks must be skipped)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def label_word_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """One token id per label word, as it appears after a space (RoBERTa 'Ġgreat', BERT 'great')."""
    ids = []
    for w in words:
        toks = tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            toks2 = tokenizer(w.strip(), add_special_tokens=False)["input_ids"]
            if len(toks2) != 1:
                raise ValueError(f"label word {w!r} is not a single token for this tokenizer: {toks}")
            toks = toks2
        ids.append(int(toks[0]))
    return ids


def encode_prompt(
    tokenizer: Any, template: str, fields: Mapping[str, str], max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Tokenise ``template.format(**fields, mask=<mask token>)`` as a batch of one, at most max_length tokens."""
    mask = tokenizer.mask_token if "{mask}" in template else ""
    if "{mask}" in template and mask is None:
        raise ValueError("the template has {mask} but the tokenizer has no mask token")
    fields = {k: str(v) for k, v in fields.items()}
    while True:
        text = template.format(mask=mask, **fields)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=True)
        if enc["input_ids"].shape[1] <= max_length:
            break
        longest = max(fields, key=lambda k: len(fields[k].split()))
        words = fields[longest].split()
        if len(words) <= 1:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            break
        fields[longest] = " ".join(words[: max(1, len(words) - max(1, len(words) // 8))])
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


class MaskedLMOutput:
    """Label-word logits at the (single) mask position of a masked-LM."""

    def __init__(self, label_ids: Sequence[int], mask_token_id: int, binary_difference: bool = True) -> None:
        self.label_ids = torch.as_tensor(list(label_ids), dtype=torch.long)
        self.mask_token_id = int(mask_token_id)
        self.binary_difference = binary_difference

    def __call__(self, model: nn.Module, example: Mapping[str, Any]) -> torch.Tensor:
        ids = example["input_ids"]
        at_mask = ids[0] == self.mask_token_id
        if not _transformed(ids):  # under vmap (the func NTK) the count cannot be read; encode_prompt ensures it
            count = int(at_mask.sum())
            if count != 1:
                raise ValueError(f"expected exactly one mask token in the example, found {count}")
        inputs = {k: v for k, v in example.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        head = next((getattr(model, h) for h in ("cls", "lm_head") if hasattr(model, h)), None)
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        # The mask position is selected with a one-hot product (exact), not an index: vmap-safe.
        if head is not None and isinstance(base, nn.Module):
            # Only the mask position goes through the vocabulary projection (a large saving on CPU).
            hidden = base(**inputs).last_hidden_state[0]
            logits = head((at_mask.to(hidden.dtype) @ hidden).unsqueeze(0))[0]
        else:
            full = model(**inputs).logits[0]
            logits = at_mask.to(full.dtype) @ full
        return _reduce(logits[self.label_ids.to(logits.device)], self.binary_difference)


class ClassifierOutput:
    """The logits of a sequence-classification model (``model(**example).logits[0]``)."""

    def __init__(self, binary_difference: bool = True) -> None:
        self.binary_difference = binary_difference

    def __call__(self, model: nn.Module, example: Mapping[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in example.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return _reduce(model(**inputs).logits[0], self.binary_difference)


def mean_pool(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**inputs).last_hidden_state
    mask = inputs.get("attention_mask")
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


class EmbeddingSimilarityOutput:
    """f_c(x) = <normalize(meanpool(h(x))), a_c>, a_c fixed normalised embeddings of the label words."""

    def __init__(self, anchors: torch.Tensor, binary_difference: bool = True) -> None:
        self.anchors = torch.nn.functional.normalize(anchors.detach(), dim=-1)
        self.binary_difference = binary_difference

    @classmethod
    def from_label_texts(
        cls, model: nn.Module, tokenizer: Any, texts: Sequence[str], binary_difference: bool = True
    ) -> "EmbeddingSimilarityOutput":
        device = next(model.parameters()).device
        with torch.no_grad():
            rows = []
            for t in texts:
                enc = tokenizer(t, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                rows.append(mean_pool(model, enc)[0])
        return cls(torch.stack(rows), binary_difference)

    def __call__(self, model: nn.Module, example: Mapping[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in example.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        e = torch.nn.functional.normalize(mean_pool(model, inputs)[0], dim=-1)
        return _reduce(self.anchors.to(e) @ e, self.binary_difference)


def make_examples(
    tokenizer: Any, template: str, rows: Sequence[Mapping[str, Any]], max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    return [encode_prompt(tokenizer, template, r, max_length) for r in rows]


__all__ = [
    "ClassifierOutput",
    "EmbeddingSimilarityOutput",
    "MaskedLMOutput",
    "encode_prompt",
    "label_word_ids",
    "make_examples",
    "mean_pool",
]
