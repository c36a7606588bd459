"""The EE wrapper of [K22] §3.2 in a plain PyTorch loop on two moons: a cosine learning-rate
schedule in exploration, the certificate of [K22] Theorem 5 on the state right after the switch,
and the exploitation phase at the certificate's constant step ``1/L̂`` (``exploit_lr="auto"``).
The schedule stops at the switch: Theorem 5's bound is for gradient descent at that step, and a
schedule built on the wrapper would otherwise keep changing it (the certificate cannot see that).

    python examples/plain_loop.py [--n 100] [--steps 1000] [--tau 600]

The last line printed is a JSON summary.
"""
import argparse
import json

import torch
from sklearn.datasets import make_moons
from torch import nn

from global_convergence import EEWrapper, ee_model, flush_denormals
from global_convergence.models import MLP


def two_moons(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_moons(n_samples=n, noise=0.1, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="training points (default 100)")
    parser.add_argument("--steps", type=int, default=1000, help="full-batch steps (default 1000)")
    parser.add_argument("--tau", type=int, default=600, help="switch step tau (default 600)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)        # a model this small runs fastest on one thread

    torch.manual_seed(0)
    x, y = two_moons(args.n)
    model = ee_model(MLP(2, 1, hidden=(64, 64)), n=args.n)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = EEWrapper(model, opt, tau=args.tau, eps=0.01, exploit_lr="auto")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(wrapper, T_max=args.steps)
    summary = {}
    with flush_denormals():
        for step in range(args.steps):
            wrapper.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)   # "ce"
            loss.backward()
            wrapper.step()
            if wrapper.phase == 1:      # phase 2 keeps the certificate's step 1/L̂
                schedule.step()
            if step + 1 == wrapper.switch_step:             # phase 2 starts: certify it
                cert = wrapper.certify(x, "ce", full_batch=True)
                bound = cert["bound"]["formula"] if cert["bound"] else "withheld"
                print(f"step {step + 1}: {cert['theorem']}: condition {cert['condition']['verdict']}, "
                      f"step 1/L = {cert['step_max']:.4g}, bound {bound}")
                summary.update(loss_at_switch=loss.item(), step_max=cert["step_max"],
                               verdict=cert["condition"]["verdict"],
                               bound_withheld_because=cert["bound_withheld_because"])
        final = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y).item()
    summary.update(phase=wrapper.phase, final_loss=final, final_lr=wrapper.param_groups[0]["lr"])
    print(f"final loss {final:.4g} (at the switch {summary['loss_at_switch']:.4g})")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
