"""The two guarantee-carrying wrappers: :class:`TwoPhase` ([KS21]) and :class:`EEWrapper` ([K22])."""
from .base import PhaseWrapper, perturb_parameters, refresh_trunk_statistics, unwrap_model
from .ee import EXPLOIT_CHOICES, LBFGS_OPTIONS, EEWrapper, build_exploit_optimizer
from .two_phase import TwoPhase

__all__ = ["EXPLOIT_CHOICES", "LBFGS_OPTIONS", "EEWrapper", "PhaseWrapper", "TwoPhase",
           "build_exploit_optimizer", "perturb_parameters", "refresh_trunk_statistics", "unwrap_model"]
