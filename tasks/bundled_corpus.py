"""Text classification on a labelled corpus that a pip package ships (the offline demo tasks).

A subclass names the package, the file inside it and its columns; users choose only what varies between
runs (validation share, lengths, batch sizes, seed, samples), and may point ``data_file`` at their own copy
of the file in the same schema.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from .local_files import packaged_file
from .text_classification import TextClassificationDataModule


class BundledCorpusDataModule(TextClassificationDataModule):
    """A packaged CSV as a classification task; ``val_fraction`` carved out for validation (seeded).

    Args are TextClassificationDataModule's; ``data_file`` overrides the packaged file.
    """

    PACKAGE: ClassVar[str]
    FILE: ClassVar[str]  # relative to the package directory
    INSTALL: ClassVar[str]  # how to get the package, for the error when it is missing
    COLUMNS: ClassVar[dict[str, Any]]  # TextClassificationDataModule arguments fixed by the corpus

    def __init__(
        self,
        tokenizer_name_or_path: str,
        data_file: Optional[str] = None,
        val_fraction: float = 0.1,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = 128,
        num_workers: int = 0,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__(
            tokenizer_name_or_path=tokenizer_name_or_path,
            data_files={"train": str(data_file or packaged_file(self.PACKAGE, self.FILE, self.INSTALL))},
            val_fraction=val_fraction,
            predict_splits=None,
            max_length=max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            cache_dir=cache_dir,
            **self.COLUMNS,
        )


__all__ = ["BundledCorpusDataModule"]
