"""rocoft_pl: RoCoFT (Row-Column Fine-Tuning, arXiv 2410.10075) for PyTorch Lightning.

Every public name is imported on first use (PEP 562): ``import rocoft_pl`` imports neither torch nor lightning,
so that ``rocoft --help`` starts at once, and ``from rocoft_pl import RoCoFT`` imports only the callback's own
modules (lightning, torch, transformers' config classes), never an extra's package (``rocoft_pl.extras``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "GlobalBatchSize": "batching",
    "RoCoFT": "callback",
    "RoCoFTConfig": "config",
    "RoCoFTLinear": "layers",
    "RoCoFTReport": "inject",
    "active_adapter": "multi_adapter",
    "adapter_names": "inject",
    "adapter_state_dict": "adapter",
    "add_adapter": "multi_adapter",
    "apply_rocoft": "inject",
    "delete_adapter": "multi_adapter",
    "disable_adapter": "multi_adapter",
    "export_lora": "export",
    "load_adapter": "adapter",
    "merge_rocoft": "inject",
    "merge_rocoft_dequantized": "quantized",
    "mixed_adapters": "multi_adapter",
    "rocoft_layers": "inject",
    "rocoft_report": "inject",
    "save_adapter": "adapter",
    "set_adapter": "multi_adapter",
    "swap_merged_adapter": "multi_adapter",
    "unload_rocoft": "inject",
    "unmerge_rocoft": "inject",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on use
    from .adapter import adapter_state_dict, load_adapter, save_adapter
    from .batching import GlobalBatchSize
    from .callback import RoCoFT
    from .config import RoCoFTConfig
    from .export import export_lora
    from .inject import (RoCoFTReport, adapter_names, apply_rocoft, merge_rocoft, rocoft_layers, rocoft_report,
                         unload_rocoft, unmerge_rocoft)
    from .layers import RoCoFTLinear
    from .multi_adapter import (active_adapter, add_adapter, delete_adapter, disable_adapter, mixed_adapters,
                                set_adapter, swap_merged_adapter)
    from .quantized import merge_rocoft_dequantized


def __getattr__(name: str) -> Any:
    submodule = _EXPORTS.get(name)
    if submodule is not None:
        value = getattr(importlib.import_module(f".{submodule}", __name__), name)
        globals()[name] = value  # once: later lookups skip __getattr__
        return value
    # ``rocoft_pl.inject`` after a bare ``import rocoft_pl`` (the eager package imported its submodules)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rocoft_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
