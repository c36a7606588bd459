"""The wrappers inside Lightning's ``Trainer`` and Hugging Face's ``Trainer``, on the CPU, through
the switch ([K22] §3.2: the trunk and output layer stay fixed in exploitation; docs/design.md:
batch-norm statistics recomputed at the switch from ``bn_data``).

Needs the optional extras: ``pip install -e '.[test,lightning,huggingface]'`` (``make test``
installs them).
"""
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from global_convergence import EEWrapper, ee_model

try:
    import pytorch_lightning as lightning
    import transformers
except ImportError as exc:      # not a skip: these integrations are part of what is tested
    raise ImportError(f"{exc}; install the extras: pip install -e '.[test,lightning,huggingface]'")

N, BATCH, TAU, STEPS = 32, 8, 6, 12


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    return x, torch.sin(2 * x[:, :1])


def _net(seed=0):
    """A trunk with batch norm, so that the switch's statistics come from ``bn_data``."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Softplus(beta=100),
                         nn.Linear(16, 16), nn.Softplus(beta=100), nn.Linear(16, 1))
    return ee_model(base, n=N)


def _frozen(model):
    """What exploitation keeps fixed: trunk parameters and buffers, output layer, gates."""
    tensors = list(model.trunk.parameters()) + list(model.trunk.buffers())
    return [t.detach().clone() for t in tensors + [model.head.out_weight, model.head.gates]]


def _bn_statistics(model, loader):
    """The trunk's batch-norm mean as ``update_bn`` recomputes it over ``loader`` (the input of
    the batch-norm layer is the first linear layer's output)."""
    with torch.no_grad():
        first = model.trunk[0]
        return torch.stack([first(x).mean(dim=0) for x, _ in loader]).mean(dim=0)


class _Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.at_switch = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        wrapper = self.trainer.optimizers[0]
        if wrapper.step_count == TAU and self.at_switch is None:
            self.at_switch = (_frozen(self.net), self.net.head.weight.detach().clone(),
                              self.net.trunk[1].running_mean.clone())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        bn_data = DataLoader(TensorDataset(*_data()), batch_size=BATCH)
        wrapper = EEWrapper(self.net, opt, tau=TAU, eps=1e-2, bn_data=bn_data)
        scheduler = torch.optim.lr_scheduler.StepLR(wrapper, step_size=4, gamma=0.5)
        return {"optimizer": wrapper, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _Data(lightning.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(*_data()), batch_size=BATCH, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode"),
              pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")]
"""The libraries' own notices (the frozen trunk is in eval mode on purpose)."""


@pytest.fixture(autouse=True)
def _quiet():
    """No progress bars, banners or summaries from the trainers."""
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch",
                                                     "lightning.fabric", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def test_lightning_trains_a_wrapper_from_configure_optimizers_through_the_switch(tmp_path):
    module, data = _Module(), _Data()
    trainer = _lightning_trainer(STEPS, tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    wrapper = trainer.optimizers[0]
    assert isinstance(wrapper, EEWrapper) and wrapper.phase == 2 and wrapper.step_count == STEPS
    frozen, weight, running_mean = module.at_switch
    assert all(torch.equal(a, b) for a, b in zip(frozen, _frozen(module.net)))
    assert not torch.equal(weight, module.net.head.weight)          # exploitation trained w_{jk}
    assert wrapper.statistics_recomputed
    torch.testing.assert_close(running_mean, _bn_statistics(module.net, data.train_dataloader()))
    assert wrapper.active_optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 3)
    assert wrapper.active_optimizer.param_groups[0]["params"] == [module.net.head.weight]


class _OrderedData(lightning.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(*_data()), batch_size=BATCH)


def _lightning_trainer(steps, root, **kwargs):
    return lightning.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=root, **kwargs)


class _Recording(_Module):
    """Records, before every step, what the step starts from."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def on_train_batch_start(self, batch, batch_idx):
        wrapper = self.trainer.optimizers[0]
        momentum = [s["momentum_buffer"].clone() for s in wrapper.state.values()]
        self.seen[wrapper.step_count] = (self.net.head.weight.detach().clone(), momentum,
                                         wrapper.param_groups[0]["lr"], batch[0].clone())


def test_lightning_resumes_a_checkpoint_after_the_switch_exactly(tmp_path):
    """The epoch-end checkpoint of step 8 (after the switch at τ = 6), resumed into a fresh module
    with other initial weights, starts from the uninterrupted run's state at step 8 and, on the
    same batch, takes the same step. (Lightning 2.6 then replays that batch once more: its own
    loop, not the optimizer, so later steps are not compared.)"""
    every_epoch = lightning.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1,
                                                      save_top_k=-1)
    whole = _Recording()
    _lightning_trainer(STEPS, tmp_path, callbacks=[every_epoch]).fit(whole, datamodule=_OrderedData())
    resumed = _Recording()
    resumed.net = _net(seed=1)
    trainer = _lightning_trainer(STEPS, tmp_path, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=_OrderedData(), ckpt_path=tmp_path / "epoch=1-step=8.ckpt")
    assert min(resumed.seen) == 8 and trainer.optimizers[0].step_count == STEPS
    for step in (8, 9):
        weight, momentum, lr, batch = whole.seen[step]
        again, again_momentum, again_lr, again_batch = resumed.seen[step]
        assert torch.equal(weight, again) and lr == again_lr and len(momentum) == 1
        assert all(torch.equal(a, b) for a, b in zip(momentum, again_momentum))
    assert torch.equal(whole.seen[8][3], resumed.seen[8][3])
    assert all(torch.equal(a, b) for a, b in zip(_frozen(whole.net), _frozen(resumed.net)))
    assert not resumed.net.head.are_gates_tied


class _Regressor(nn.Module):
    """A tiny model in the Hugging Face convention: keyword inputs, a dict with the loss."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class _Pairs(Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _AtSwitch(transformers.TrainerCallback):
    def __init__(self, net):
        self.net, self.snapshot = net, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == TAU:
            self.snapshot = (_frozen(self.net), self.net.head.weight.detach().clone())


def test_hugging_face_trainer_takes_the_wrapper_and_its_scheduler_through_the_switch(tmp_path):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    bn_data = DataLoader(TensorDataset(*_data()), batch_size=BATCH)
    wrapper = EEWrapper(net, opt, tau=TAU, eps=1e-2, bn_data=bn_data)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(wrapper, T_max=STEPS)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
        use_cpu=True, report_to=[], disable_tqdm=True, logging_strategy="no", save_strategy="no",
        max_grad_norm=0.0, dataloader_num_workers=0, seed=0)
    callback = _AtSwitch(net)
    trainer = transformers.Trainer(model=_Regressor(net), args=args, train_dataset=_Pairs(),
                                   optimizers=(wrapper, scheduler), callbacks=[callback])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    assert wrapper.phase == 2 and wrapper.step_count == STEPS
    frozen, weight = callback.snapshot
    assert all(torch.equal(a, b) for a, b in zip(frozen, _frozen(net)))
    assert not torch.equal(weight, net.head.weight)
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=STEPS)
    for _ in range(STEPS):
        reference.step()
        cosine.step()
    assert wrapper.active_optimizer.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
