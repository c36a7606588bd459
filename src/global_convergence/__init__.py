"""global-convergence: training with global convergence guarantees for PyTorch.

Wrappers, both ``torch.optim.Optimizer`` subclasses that any loop, LR scheduler or trainer takes:
:class:`TwoPhase` (Kawaguchi & Sun, AAAI 2021) and :class:`EEWrapper` (Kawaguchi, Neural
Computation 2022); after the switch ``wrapper.certify(x, loss)`` gives the convergence certificate. Model preparation: :func:`two_phase_model`, :func:`ee_model`,
:func:`make_analytic`, :func:`non_analytic_modules`. Verifiers live in
``global_convergence.conditions``, Jacobians and NTKs in ``global_convergence.ntk``.

softplus(β=100) networks produce float32 subnormals that slow x86 CPUs several-fold; wrap CPU
training in ``with flush_denormals():`` (the ``gconv`` CLI always does).
"""
from .errors import NumericalError, UserInputError
from .losses import Loss, make_loss
from .models import (EEModel, TwoPhaseModel, build_model, ee_model, flush_denormals, make_analytic,
                     non_analytic_modules, two_phase_model)
from .wrappers import EEWrapper, PhaseWrapper, TwoPhase

__version__ = "0.1.0"

__all__ = ["EEModel", "EEWrapper", "Loss", "NumericalError", "TwoPhase", "TwoPhaseModel",
           "PhaseWrapper", "UserInputError", "build_model", "ee_model", "flush_denormals", "make_analytic",
           "make_loss", "non_analytic_modules", "two_phase_model"]
