"""rocoft_pl: RoCoFT (Row-Column Fine-Tuning, arXiv 2410.10075) for PyTorch Lightning.

Import cost matters for the CLI and subprocess tests, so the Lightning callback is imported lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .adapter import adapter_state_dict, load_adapter, save_adapter
from .config import RoCoFTConfig
from .export import export_lora
from .inject import (
    RoCoFTReport,
    adapter_names,
    apply_rocoft,
    merge_rocoft,
    rocoft_layers,
    rocoft_report,
    unload_rocoft,
    unmerge_rocoft,
)
from .layers import RoCoFTLinear
from .multi_adapter import (
    active_adapter,
    add_adapter,
    delete_adapter,
    disable_adapter,
    mixed_adapters,
    set_adapter,
    swap_merged_adapter,
)
from .quantized import merge_rocoft_dequantized


def __getattr__(name: str) -> Any:
    if name == "RoCoFT":
        from .callback import RoCoFT

        return RoCoFT
    if name == "GlobalBatchSize":
        from .batching import GlobalBatchSize

        return GlobalBatchSize
    raise AttributeError(f"module 'rocoft_pl' has no attribute {name!r}")


__all__ = [
    "GlobalBatchSize",
    "RoCoFT",
    "RoCoFTConfig",
    "RoCoFTLinear",
    "RoCoFTReport",
    "active_adapter",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "apply_rocoft",
    "delete_adapter",
    "disable_adapter",
    "export_lora",
    "load_adapter",
    "merge_rocoft",
    "merge_rocoft_dequantized",
    "mixed_adapters",
    "rocoft_layers",
    "rocoft_report",
    "save_adapter",
    "set_adapter",
    "swap_merged_adapter",
    "unload_rocoft",
    "unmerge_rocoft",
]
