"""A check both quantized-base grids' parse tests share (configs/bench/quantized.yaml, quantized_minilm.yaml)."""

from __future__ import annotations

from typing import Any


def check_quantized_cell(cell: Any, key: str, nf4_keys: set[str]) -> None:
    """The cell's base (NF4 with fp32 compute, or none) and its method: LoRA r=8 alpha 16, or RoCoFT rows (16 when
    the key says r16, else 3)."""
    init = cell.config["model"]["init_args"]
    if key in nf4_keys:
        assert init["quantization"] == "nf4" and init["quantization_options"] == {"compute_dtype": "float32"}, key
    else:
        assert "quantization" not in init, key
    if cell.method == "lora":
        assert cell.method_params == {"r": 8, "alpha": 16}, key
    else:
        assert cell.method == "rocoft-row" and cell.method_params == {"rank": 16 if "r16" in key else 3}, key
