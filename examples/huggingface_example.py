"""The two-phase method of [KS21] (Algorithm 1) inside the Hugging Face ``Trainer``:
``optimizers=(wrapper, scheduler)`` on a tiny model, then the certificate of [KS21] Theorem 1(i)
on the state after the switch.

    pip install 'global-convergence[huggingface]'
    python examples/huggingface_example.py [--n 128] [--steps 160] [--tau 96]

The last line printed is a JSON summary.
"""
import argparse
import json
import tempfile

import torch
import transformers
from sklearn.datasets import make_moons
from torch import nn
from torch.utils.data import Dataset

from global_convergence import TwoPhase, flush_denormals, two_phase_model
from global_convergence.models import MLP


class Moons(Dataset):
    """Two moons as the dicts a ``Trainer`` batches: inputs ``x`` and ``labels``."""

    def __init__(self, n: int) -> None:
        x, y = make_moons(n_samples=n, noise=0.1, random_state=0)
        self.x, self.y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Classifier(nn.Module):
    """A module in the ``Trainer``'s convention: keyword inputs, a dict holding the loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)[:, 0]
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, labels), "logits": logits}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="training points (default 128)")
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps (default 160)")
    parser.add_argument("--tau", type=int, default=96, help="switch step tau (default 96)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    data = Moons(args.n)
    net = two_phase_model(MLP(2, 1, hidden=(64, 256)), n=args.n)     # 256 ≥ n: no layer added
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    wrapper = TwoPhase(net, opt, tau=args.tau, delta0=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(wrapper, T_max=args.steps)
    with tempfile.TemporaryDirectory() as out, flush_denormals():
        training = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=32, use_cpu=True,
            report_to=[], disable_tqdm=True, logging_strategy="no", save_strategy="no", seed=0)
        trainer = transformers.Trainer(model=Classifier(net), args=training, train_dataset=data,
                                       optimizers=(wrapper, schedule))
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        result = trainer.train()
    cert = wrapper.certify(data.x, "ce")        # minibatch SGD with momentum: the bound is withheld
    summary = {"phase": wrapper.phase, "steps": wrapper.step_count, "train_loss": result.training_loss,
               "verdict": cert["condition"]["verdict"], "optimizer": cert["optimizer"],
               "bound_withheld_because": cert["bound_withheld_because"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
