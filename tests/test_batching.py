"""GlobalBatchSize: the rows per optimizer step stay the paper's whatever the world size."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from rocoft_pl import GlobalBatchSize
from rocoft_pl.batching import split_global_batch


@pytest.mark.parametrize(
    "size, world, most, expected",
    [(9, 1, 3, (3, 3)), (16, 1, 8, (8, 2)), (16, 8, 8, (2, 1)), (16, 2, 3, (2, 4)), (7, 1, 4, (1, 7)), (4, 4, 1, (1, 1))],
)
def test_split_fits_the_device_with_the_fewest_accumulation_steps(size, world, most, expected):
    per_device, accumulation = split_global_batch(size, world, most)
    assert (per_device, accumulation) == expected
    assert per_device * world * accumulation == size and per_device <= most


def test_a_global_batch_that_does_not_split_over_the_devices_names_the_nearest():
    with pytest.raises(ValueError, match=r"9 does not split over 8 devices.*nearest: 8 or 16"):
        split_global_batch(9, 8, 3)
    with pytest.raises(ValueError, match="global batch size must be an int >= 1"):
        GlobalBatchSize(0)


class Rows(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(torch.arange(48, dtype=torch.float32).unsqueeze(1), batch_size=self.batch_size)


class Counting(pl.LightningModule):
    """Records the rows of every micro-batch and the optimizer steps taken."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.rows: list[int] = []

    def training_step(self, batch, batch_idx):
        self.rows.append(len(batch))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_fit_takes_the_global_batch_per_optimizer_step(tmp_path):
    module, data = Counting(), Rows(batch_size=3)
    callback = GlobalBatchSize(8)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert callback.split == (2, 4) and data.batch_size == 2 and trainer.accumulate_grad_batches == 4
    assert set(module.rows) == {2} and trainer.global_step == 48 // 8


def test_the_split_follows_the_world_size_and_refuses_a_hand_set_accumulation():
    data = Rows(batch_size=3)
    trainer = SimpleNamespace(datamodule=data, world_size=4, accumulate_grad_batches=1, is_global_zero=True)
    GlobalBatchSize(16).setup(trainer, None, "fit")
    assert (data.batch_size, trainer.accumulate_grad_batches) == (2, 2)  # 4 devices x 2 rows x 2 steps
    trainer.accumulate_grad_batches = 3
    with pytest.raises(ValueError, match="leave trainer.accumulate_grad_batches at 1"):
        GlobalBatchSize(16).setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="int `batch_size`"):
        GlobalBatchSize(16).setup(SimpleNamespace(datamodule=None, world_size=1, accumulate_grad_batches=1), None, "fit")


def test_size_none_is_off():
    data = Rows(batch_size=3)
    trainer = SimpleNamespace(datamodule=data, world_size=4, accumulate_grad_batches=5, is_global_zero=True)
    GlobalBatchSize().setup(trainer, None, "fit")
    assert (data.batch_size, trainer.accumulate_grad_batches) == (3, 5)
