"""The EE wrapper of [K22] §3.2 inside Lightning: ``configure_optimizers`` returns the wrapper and
a step-wise learning-rate schedule; the batch-norm statistics of the frozen trunk are recomputed
at the switch over the datamodule's training batches (``bn_data``).

    pip install 'global-convergence[lightning]'
    python examples/lightning_example.py [--n 128] [--steps 160] [--tau 96]

(``import lightning.pytorch as pl`` works the same way.) The last line printed is a JSON summary.
"""
import argparse
import json
import logging
import warnings

import pytorch_lightning as pl
import torch
from sklearn.datasets import make_moons
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from global_convergence import EEWrapper, ee_model, flush_denormals

BATCH = 32


class Moons(pl.LightningDataModule):
    def __init__(self, n: int) -> None:
        super().__init__()
        x, y = make_moons(n_samples=n, noise=0.1, random_state=0)
        self.data = TensorDataset(torch.tensor(x, dtype=torch.float32),
                                  torch.tensor(y, dtype=torch.float32))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH, shuffle=True)

    def statistics_dataloader(self) -> DataLoader:
        """All training inputs, without shuffling or augmentation: ``bn_data`` of the switch."""
        return DataLoader(self.data, batch_size=BATCH)


class Classifier(pl.LightningModule):
    def __init__(self, n: int, tau: int) -> None:
        super().__init__()
        base = nn.Sequential(nn.Linear(2, 64), nn.BatchNorm1d(64), nn.Softplus(beta=100),
                             nn.Linear(64, 64), nn.Softplus(beta=100), nn.Linear(64, 1))
        self.net, self.tau = ee_model(base, n=n), tau
        self.frozen_at_switch: list[torch.Tensor] | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self.net(x)[:, 0], y)
        self.last_loss = loss.item()
        return loss

    def frozen(self) -> list[torch.Tensor]:
        """What exploitation keeps fixed: trunk (parameters, batch-norm statistics), output layer."""
        tensors = [*self.net.trunk.parameters(), *self.net.trunk.buffers(), self.net.head.out_weight]
        return [t.detach().clone() for t in tensors]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.optimizers[0].step_count == self.tau and self.frozen_at_switch is None:
            self.frozen_at_switch = self.frozen()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        bn_data = self.trainer.datamodule.statistics_dataloader()
        wrapper = EEWrapper(self.net, opt, tau=self.tau, eps=1e-3, bn_data=bn_data)
        schedule = torch.optim.lr_scheduler.StepLR(wrapper, step_size=40, gamma=0.5)
        return {"optimizer": wrapper, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="training points (default 128)")
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps (default 160)")
    parser.add_argument("--tau", type=int, default=96, help="switch step tau (default 96)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers)")  # library notices
    pl.seed_everything(0, verbose=False)
    module, data = Classifier(args.n, args.tau), Moons(args.n)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with flush_denormals():
        trainer.fit(module, datamodule=data)
    wrapper = trainer.optimizers[0]
    unchanged = all(torch.equal(a, b) for a, b in zip(module.frozen_at_switch, module.frozen()))
    summary = {"phase": wrapper.phase, "steps": wrapper.step_count, "final_batch_loss": module.last_loss,
               "frozen_bit_identical": unchanged, "statistics_recomputed": wrapper.statistics_recomputed,
               "lr": wrapper.param_groups[0]["lr"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
