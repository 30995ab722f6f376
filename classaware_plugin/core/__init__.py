"""The framework-agnostic core: loss, statistics, scores, metrics, controller, calibration.

Nothing here imports NNI or Torch-Pruning (a test checks it).
"""
from __future__ import annotations

from ._validation import ClassAwareError
from .calibration import Calibration, calibrate, find_logit_shifts
from .controller import (
    ControllerResult,
    FNConstrainedPruning,
    FNConstraint,
    NonFiniteLossError,
    NothingToPrune,
    PruningBackend,
    StepRecord,
)
from .lottery import MaskSet, RewindSnapshot
from .loss import ClassDependentLoss, make_class_weights
from .metrics import Evaluation, evaluate, evaluate_predictions, predict
from .progress import set_quiet
from .saliency import ClassSaliency, ScoreMap, StaleStatisticsError
from .scores import Score, available_scores, make_score, reduce_to_channels, register_score
from .training import train

__all__ = [
    "Calibration", "ClassAwareError", "ClassDependentLoss", "ClassSaliency", "ControllerResult", "Evaluation",
    "FNConstrainedPruning", "FNConstraint", "MaskSet", "NonFiniteLossError", "NothingToPrune", "PruningBackend",
    "RewindSnapshot", "Score", "ScoreMap", "StaleStatisticsError", "StepRecord", "available_scores", "calibrate",
    "evaluate", "evaluate_predictions", "find_logit_shifts", "make_class_weights", "make_score", "predict",
    "reduce_to_channels", "register_score", "set_quiet", "train",
]
