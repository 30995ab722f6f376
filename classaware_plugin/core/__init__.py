"""The framework-agnostic core: loss, statistics, scores, metrics, controller, calibration.

Nothing here imports NNI or Torch-Pruning (a test checks it).
"""
from __future__ import annotations

from .validation import ClassAwareError
from .calibration import Calibration, calibrate, find_logit_shifts
from .backend import ModelBackend, PruningBackend
from .controller import (
    DECISIONS,
    STOP_REASONS,
    ControllerResult,
    Decision,
    FNConstrainedPruning,
    FNConstraint,
    NonFiniteLossError,
    NothingToPrune,
    StepRecord,
    StopReason,
)
from .guarantee import (
    Certificate,
    ClassBudget,
    FNGuarantee,
    fn_rate_upper_bound,
    positives_needed,
    split_for_certification,
)
from .distributed import RanksDivergedError, resolve_device, shard_loader
from .lottery import MaskSet, RewindSnapshot
from .loss import ClassDependentLoss, make_class_weights
from .metrics import Evaluation, OperatingPoint, evaluate, evaluate_predictions, fn_at_fpr, fpr_of, predict
from .progress import set_quiet
from .channels import ChannelFisher, ChannelScores
from .statistics import ClassSaliency, ScoreMap, StaleStatisticsError, WeightStatistics
from .scores import DEFAULT_SCORE, Score, available_scores, make_score, reduce_to_channels, register_score, score_options
from .training import Distillation, EarlyStopping, train, validation_loss

__all__ = [
    "Calibration", "Certificate", "ClassBudget", "FNGuarantee", "fn_rate_upper_bound", "positives_needed",
    "split_for_certification", "ChannelFisher", "ChannelScores", "ClassAwareError", "ClassDependentLoss", "ClassSaliency", "DEFAULT_SCORE", "ControllerResult", "Distillation", "EarlyStopping", "Evaluation",
    "DECISIONS", "Decision", "FNConstrainedPruning", "FNConstraint", "MaskSet", "ModelBackend", "STOP_REASONS", "StopReason", "NonFiniteLossError", "NothingToPrune", "PruningBackend",
    "RanksDivergedError", "RewindSnapshot", "Score", "ScoreMap", "StaleStatisticsError", "StepRecord", "available_scores", "calibrate",
    "OperatingPoint", "evaluate", "evaluate_predictions", "fn_at_fpr", "fpr_of", "find_logit_shifts", "make_class_weights", "make_score", "predict",
    "reduce_to_channels", "register_score", "resolve_device", "shard_loader", "score_options", "set_quiet", "train", "validation_loss", "WeightStatistics",
]
