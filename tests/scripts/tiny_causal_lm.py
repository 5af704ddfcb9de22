"""Tiny causal LMs and an in-process tokenizer for the reasoning / causal-LM / lm-eval / FSDP tests.

No download: a byte-level BPE tokenizer is trained in milliseconds on the reasoning fixtures and the
prompt template, and the models are built from configs (a 2-block Llama and a 2-block GPT-2 with Conv1D).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reasoning"
DATASET_FILES = {
    n: str(FIXTURES / f"{n}.jsonl")
    for n in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "openbookqa",
              "gsm8k", "multiarith", "svamp", "addsub", "singleeq", "aqua", "mawps")
}
MERGED_FILES = {"commonsense_170k": str(FIXTURES / "commonsense_170k.json"), "math_10k": str(FIXTURES / "math_10k.json")}


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE (lossless decode) trained on the fixture texts; <pad> = 0, <eos> = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [p.read_text() for p in sorted(FIXTURES.rglob("*.json*"))]
    corpus.append("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\n### Input:\n### Response:\nthe correct answer is The answer is")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")


def tiny_llama(vocab_size: int = 400, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                  attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs))


def tiny_gpt2(vocab_size: int = 400, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0,
                        embd_pdrop=0, attn_pdrop=0, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return GPT2LMHeadModel(config)
