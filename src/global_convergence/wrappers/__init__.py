"""The two guarantee-carrying wrappers, both ``torch.optim.Optimizer`` subclasses:
:class:`TwoPhase` ([KS21] Algorithm 1) and :class:`EEWrapper` ([K22] §3.2)."""
from .base import PhaseWrapper, perturb_parameters, refresh_trunk_statistics, unwrap_model
from .ee import EXPLOIT_CHOICES, LBFGS_OPTIONS, EEWrapper, build_exploit_optimizer
from .policy import check_analytic, optimizer_facts
from .two_phase import TwoPhase

__all__ = ["EXPLOIT_CHOICES", "LBFGS_OPTIONS", "EEWrapper", "PhaseWrapper", "TwoPhase",
           "build_exploit_optimizer", "check_analytic", "optimizer_facts", "perturb_parameters",
           "refresh_trunk_statistics", "unwrap_model"]
