"""RoCoFTConfig: every knob of Row-Column Fine-Tuning, validated on construction."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union

Mode = Literal["row", "column", "entries", "both"]
Selection = Literal["first", "random", "max", "min", "mixed"]

MODES = ("row", "column", "entries", "both")
SELECTIONS = ("first", "random", "max", "min", "mixed")
WANDA_SELECTIONS = ("max", "min", "mixed")


@dataclass
class RoCoFTConfig:
    """Which weights RoCoFT trains. W = W0 + R (rows) or W = W0 + C (columns), paper eq. (2); or both."""

    mode: Mode = field(
        default="row",
        metadata={
            "help": "'row': train r output features (rows of the out x in weight) per matrix; "
            "'column': train r input features; 'both': r rows and r columns of every matrix, "
            "r*in + r*out - r*r parameters (the r x r overlap counted once; off by default, the paper's "
            "future work); 'entries': train a random fraction p of the entries "
            "(the paper's ablation B.2; it costs about as much as full fine-tuning per matrix)."
        },
    )
    rank: int = field(
        default=3,
        metadata={"help": "r, the number of rows or columns (mode 'both': of each) trained per matrix (the paper uses 1 and 3)."},
    )
    p: float = field(
        default=0.1,
        metadata={"help": "Entries mode only: probability that an entry is trainable (paper: 0.1, 0.01)."},
    )
    targets: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "None: every nn.Linear / transformers Conv1D inside the transformer blocks. "
            "A list: module-name suffixes (e.g. ['query', 'value']). A string: a regex matched "
            "against the full module name (re.fullmatch)."
        },
    )
    selection: Selection = field(
        default="first",
        metadata={
            "help": "'first': the first r (the paper's main setting); 'random': seeded uniform; "
            "'max' / 'min' / 'mixed': by Wanda score |W_ij| * ||X_j||_2 from calibration inputs, "
            "highest, lowest, or half from each end. Mode 'both' selects rows and columns alike, each by its own "
            "scores (random: independent draws)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for 'random' selection and entries sampling."})
    train_bias: bool = field(
        default=False,
        metadata={"help": "Also train the biases of the targeted layers (Table 10 'Bias')."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules trained fully and counted separately (the task head). None: auto-detect "
            "classifier / score / qa_outputs / classification_head; [] for none. lm_head only if named."
        },
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RoCoFTConfig.mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"RoCoFTConfig.rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0.0 < self.p <= 1.0:
            raise ValueError(f"RoCoFTConfig.p must be a probability in (0, 1], got {self.p!r}")
        self.p = float(self.p)
        if self.selection not in SELECTIONS:
            raise ValueError(f"RoCoFTConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.mode == "entries" and self.selection != "random":
            raise ValueError(
                "RoCoFTConfig: mode='entries' samples entries uniformly at random (paper B.2); "
                f"set selection='random' (got {self.selection!r})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"RoCoFTConfig.seed must be an int, got {self.seed!r}")
        if not isinstance(self.train_bias, bool):
            raise ValueError(f"RoCoFTConfig.train_bias must be a bool, got {self.train_bias!r}")
        self.targets = _validate_targets(self.targets)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ValueError(
                    f"RoCoFTConfig.modules_to_save must be None or a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save)

    @property
    def needs_calibration(self) -> bool:
        """Whether selection scores weights with activations (Wanda)."""
        return self.selection in WANDA_SELECTIONS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoCoFTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown RoCoFTConfig fields: {sorted(unknown)}")
        return cls(**data)


def _validate_targets(targets: Any) -> Optional[Union[list[str], str]]:
    if targets is None:
        return None
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"RoCoFTConfig.targets is not a valid regex: {targets!r} ({err})") from None
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        return list(targets)
    raise ValueError(
        f"RoCoFTConfig.targets must be None, a non-empty list of module-name suffixes or a regex string, got {targets!r}"
    )
