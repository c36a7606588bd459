"""The loop behind ``gconv train``: metrics, certificates, checkpoints, resume, DDP."""
from .build import Run, build_run
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .config import METHODS, Schedule, TrainConfig, make_schedule
from .evaluation import evaluate, predict
from .loop import LogEvent, train
from .state import CHECKPOINT_NAME, RunState, checkpoint_state

__all__ = ["CHECKPOINT_NAME", "METHODS", "LogEvent", "Run", "RunState", "Schedule", "TrainConfig",
           "atomic_write_text", "build_run", "checkpoint_state", "evaluate", "load_checkpoint",
           "make_schedule", "predict", "save_checkpoint", "train"]
