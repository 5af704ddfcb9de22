"""``rocoft``: Lightning's CLI with any LightningModule / LightningDataModule chosen by ``class_path``.

    rocoft fit --config configs/glue/rte.yaml
    rocoft validate --config configs/glue/rte.yaml --ckpt_path ...
    rocoft predict --config configs/glue/rte.yaml --ckpt_path ...   # GLUE submission TSVs

RoCoFT is a callback (``trainer.callbacks: [{class_path: rocoft_pl.RoCoFT, ...}]``). Links: the model's
``model_name_or_path`` is the datamodule's ``tokenizer_name_or_path`` (``pkg:<module>`` resolved), and the
datamodule's ``num_labels`` is the model's, so the classes chosen must have these arguments (any module of
yours works with the RoCoFT callback; use Lightning's own LightningCLI for one without them). After ``predict``, a
datamodule with ``write_predictions(predictions, output_dir)`` writes its files into the run's log dir.
Runs are seeded (``seed_everything: 42`` unless the config says otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


def _resolve_pretrained(name: Any) -> Any:
    from .modules.classification import resolve_pretrained

    return resolve_pretrained(name) if isinstance(name, str) else name


class RoCoFTCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with RoCoFT's links and defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "model.init_args.model_name_or_path",
            "data.init_args.tokenizer_name_or_path",
            compute_fn=_resolve_pretrained,
        )
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")

    def predict(self, model: Any, datamodule: Any = None, **kwargs: Any) -> Any:
        predictions = self.trainer.predict(model, datamodule=datamodule, **kwargs)
        writer = getattr(datamodule, "write_predictions", None)
        if predictions is not None and callable(writer):
            out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
            for path in writer(predictions, out_dir):
                print(f"predictions written to {path}")
        return predictions


def main(args: Any = None) -> None:
    RoCoFTCLI(args=args)


if __name__ == "__main__":
    main()
