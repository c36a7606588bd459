"""The loop behind ``gconv train``: metrics, certificates, checkpoints, resume, DDP."""
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .config import METHODS, Schedule, TrainConfig, make_schedule
from .loop import (CHECKPOINT_NAME, LogEvent, Run, build_run, checkpoint_state, evaluate, predict,
                   train)

__all__ = ["CHECKPOINT_NAME", "METHODS", "LogEvent", "Run", "Schedule", "TrainConfig",
           "atomic_write_text", "build_run", "checkpoint_state", "evaluate", "load_checkpoint",
           "make_schedule", "predict", "save_checkpoint", "train"]
