"""Every benchmarked method as a function ``(ctx, level) -> (pruned model, info)``.

All methods start from the same dense model, use the same fine-tuning loss and the same fine-tune budget per
pruning step, and the same step schedule (structured: 20% of the remaining channels per step; unstructured:
50% of the remaining weights per step, the paper's rate), so only the importance score and the stopping rule
differ. ``*_fn`` methods add the FN-constrained stopping rule, ``*_cal`` decision calibration.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn

from classaware_plugin.core import (
    ClassDependentLoss,
    Distillation,
    FNConstrainedPruning,
    FNConstraint,
    RewindSnapshot,
    calibrate,
    evaluate,
    make_score,
    train,
)
from classaware_plugin.core.training import recalibrate_batchnorm
from classaware_plugin.torch_pruning import ClassAwareImportance, TorchPruningBackend, count_params_macs, make_permanent
from classaware_plugin.unstructured import UnstructuredBackend

# The FN rule used by every *_fn method: FN_c <= FN_c(dense) + max(1, ceil(0.1 FN_c(dense))), accuracy drop <= 3 points.
FN_RULE = dict(abs_tol=1, rel_tol=0.1, max_accuracy_drop=0.03)


@dataclass
class Context:
    suite: Any
    seed: int
    dense: nn.Module
    init_state: dict[str, torch.Tensor]        # weights at initialisation (lottery-ticket rewind point)
    early_state: dict[str, torch.Tensor]       # weights after the first dense epoch (late rewinding)
    loaders: dict[str, Any]
    num_classes: int
    input_shape: tuple[int, ...]
    train_counts: list[int]
    # (method, level) -> (pruned model, its raw row) of a method already run in this suite and seed, or None
    previous: Callable[[str, float], tuple[nn.Module, dict[str, Any]] | None] = lambda method, level: None
    dense_fpr: float = 0.0                     # the dense model's validation FPR of the (first) important class

    @property
    def important(self) -> list[int]:
        return list(self.suite.data.important)

    def loss(self, class_dependent: bool = True, logit_adjustment: float = 0.0,
             ranking: float | None = None) -> nn.Module:
        """The class-dependent loss, or cross-entropy (logit-adjusted by ``logit_adjustment`` > 0; with the suite's
        ranking term over FPR <= ``ranking`` added when it is given, 1 being the full AUC)."""
        if class_dependent:
            return ClassDependentLoss(self.important, class_counts=self.train_counts,
                                      rank_weight=self.suite.rank_weight)
        if logit_adjustment or ranking is not None:
            return ClassDependentLoss(self.important, class_counts=self.train_counts, class_weights="none",
                                      rank_weight=0.0 if ranking is None else self.suite.rank_weight,
                                      rank_max_fpr=1.0 if ranking is None else ranking,
                                      logit_adjustment=logit_adjustment)
        return nn.CrossEntropyLoss()

    def pass_seed(self, k: int) -> int:
        """The seed of this seed's ``k``-th pass over the training data (fine-tuning pass ``k`` >= 1, BatchNorm
        recalibration 0): the same for every method, so that every method sees the same shuffles."""
        return self.seed * 7919 + k

    def finetuner(self, epochs: float, class_dependent: bool = True, after: Callable[[nn.Module], None] | None = None,
                  distill: float = 0.0, logit_adjustment: float = 0.0, ranking: float | None = None):
        """Fine-tuning for ``epochs`` with the chosen loss (see :meth:`loss`); ``distill`` > 0 blends in distillation
        from the dense model (:class:`~classaware_plugin.core.Distillation`, that weight, temperature 4)."""
        loss = self.loss(class_dependent, logit_adjustment, ranking)
        distillation = Distillation(self.dense, weight=distill) if distill else None
        counter = {"k": 0}
        lr = self.suite.finetune_lr if self.suite.finetune_lr is not None else self.suite.lr / 2

        def finetune(m: nn.Module) -> None:
            counter["k"] += 1
            torch.manual_seed(self.pass_seed(counter["k"]))
            self.loaders["generator"].manual_seed(self.pass_seed(counter["k"]))  # same shuffles for every method
            if after is not None:
                after(m)
            train(m, self.loaders["train"], loss, epochs=epochs, lr=lr, schedule=self.suite.finetune_schedule,
                  weight_decay=self.suite.weight_decay, progress=False, distillation=distillation)

        return finetune

    def bn_recalibration(self, batches: int = 20) -> Callable[[nn.Module], None]:
        """Re-estimate every BatchNorm's running statistics on ``batches`` training batches (train mode, no
        gradients, cumulative average; "adaptive BN", Li et al., EagleEye, ECCV 2020): the weights stay as pruned,
        only the statistics follow the channels that were removed upstream. The same batches for every method."""

        def recalibrate(m: nn.Module) -> None:
            self.loaders["generator"].manual_seed(self.pass_seed(0))
            recalibrate_batchnorm(m, self.loaders["train"], batches)

        return recalibrate


def _constraint(ctx: Context, fn_rule: bool, operating_point: str = "argmax") -> FNConstraint:
    if fn_rule:
        return FNConstraint(ctx.important, **FN_RULE, operating_point=operating_point)
    return FNConstraint(ctx.important, abs_tol=10**9, max_accuracy_drop=None)  # never binds: plain schedule


def _run(ctx: Context, backend: Any, level: float, key: str, step: float, fn_rule: bool, max_steps: int = 40,
         operating_point: str = "argmax"):
    loop = FNConstrainedPruning(backend, _constraint(ctx, fn_rule, operating_point), target=level, target_key=key,
                                step=step,
                                max_halvings=3 if fn_rule else 0, max_steps=max_steps)
    res = loop.run()
    return res


def _finish(ctx: Context, model: nn.Module, res: Any) -> tuple[nn.Module, dict[str, Any]]:
    make_permanent(model)
    return model, {"stop_reason": res.stop_reason, "attempts": len(res.history),
                   "reached": res.measure.get("macs_reduction", res.measure.get("sparsity")),
                   # why each rejected attempt was rejected (the FN budget, the accuracy guard or both)
                   "rejections": [r.violations for r in res.history if not r.compliant]}


def calibrate_to_dense(ctx: Context, model: nn.Module) -> dict[str, Any]:
    """Decision calibration on validation, aiming at the dense model's validation FN."""
    dense_val = evaluate(ctx.dense, ctx.loaders["val"], ctx.important)
    cal = calibrate(model, ctx.loaders["val"], ctx.important, {c: dense_val.fn[c] for c in ctx.important})
    return {"calibration_shift": {str(c): s for c, s in cal.shifts.items()}}


def calibrated(base: str, table: dict[str, Callable[..., Any]]):
    """``base`` followed by decision calibration on validation (aim: the dense model's validation FN). Pruning is
    seeded, so the base method's pruned model is reused when this seed and level already ran it."""

    def method(ctx: Context, level: float) -> tuple[nn.Module, dict[str, Any]]:
        prev = ctx.previous(base, level)
        if prev is not None:
            model = prev[0]
            info = {k: prev[1][k] for k in ("stop_reason", "attempts", "reached") if k in prev[1]}
        else:
            model, info = table[base](ctx, level)
        return model, {**info, "calibrated_from": base, **calibrate_to_dense(ctx, model)}

    return method


# ----------------------------------------------------------------------------- structured (Torch-Pruning)
def structured(score: str, fn_rule: bool, importance: str = "ours", class_dependent: bool = True,
               calibration: bool = False, operating_point: str = "argmax", distill: float = 0.0,
               logit_adjustment: float = 0.0, ranking: float | None = None, finetune: bool = True, **imp_kwargs: Any):
    """Iterative structured pruning (20% of the remaining channels per step, ``finetune_epochs`` per step) with a
    TP estimator or ours; ``class_dependent``, ``logit_adjustment`` and ``ranking`` pick the fine-tuning loss
    (:meth:`Context.loss`; ``distill``: blended with distillation from the dense model), ``fn_rule`` the
    FN-constrained stop (judged at ``operating_point``), ``calibration`` decision calibration at the end;
    ``finetune=False`` prunes with no training at all, only the BatchNorm statistics re-estimated after each step
    (:meth:`Context.bn_recalibration`): what the score's choice of channels alone keeps."""

    def method(ctx: Context, level: float) -> tuple[nn.Module, dict[str, Any]]:
        model = copy.deepcopy(ctx.dense)
        if importance == "tp_magnitude":
            imp = tp.importance.GroupMagnitudeImportance(p=2)
        elif importance == "tp_taylor":
            imp = tp.importance.GroupTaylorImportance()
        else:
            imp = ClassAwareImportance(ctx.important, score=score, num_classes=ctx.num_classes, **imp_kwargs)
            if imp.score is not None and imp.score.needs_rewind:
                init = copy.deepcopy(model)
                init.load_state_dict(ctx.init_state)
                imp.set_rewind_point(init)  # first step: w_0 = initialisation, as in the paper
        backend = TorchPruningBackend(model, torch.zeros(2, *ctx.input_shape), imp, ctx.loaders["val"], ctx.important,
                      calib_loader=ctx.loaders["calib"],
                      finetune=ctx.finetuner(ctx.suite.finetune_epochs, class_dependent=class_dependent,
                                             distill=distill, logit_adjustment=logit_adjustment,
                                             ranking=ranking) if finetune else ctx.bn_recalibration(),
                      round_to=None)  # the committed protocol results compare scores at unrounded channel counts
        res = _run(ctx, backend, level, "macs_reduction", 0.2, fn_rule, operating_point=operating_point)
        model, info = _finish(ctx, model, res)
        if calibration:
            info.update(calibrate_to_dense(ctx, model))
        return model, info

    return method


# ----------------------------------------------------------------------------- unstructured (torch.nn.utils.prune)
class _LotteryBackend(UnstructuredBackend):
    """Iterative magnitude pruning with rewinding: after each prune the survivors go back to the rewind point."""

    def __init__(self, *a: Any, rewind_state: dict[str, torch.Tensor], **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.rewind_state = rewind_state

    def prune(self, fraction: float) -> None:
        super().prune(fraction)
        with torch.no_grad():
            own = self.model.state_dict()
            for k, v in self.rewind_state.items():
                target = k if k in own else None
                if target is None and k.endswith(("weight", "bias")):
                    target = f"{k}_orig" if f"{k}_orig" in own else None
                if target is not None:
                    own[target].copy_(v)


def unstructured(score: str, fn_rule: bool = False, rewind: bool = False, class_dependent: bool = True,
                 one_shot: bool = False, **score_kw: Any):
    def method(ctx: Context, level: float) -> tuple[nn.Module, dict[str, Any]]:
        model = copy.deepcopy(ctx.dense)
        # SNIP is the signed Taylor score with every class weighted alike (|w g| of the loss over all data).
        name, extra = ("taylor_signed", dict(omega=1.0, normalization="none")) if score == "snip" else (score, {})
        s = make_score(name, important_classes=ctx.important, num_classes=ctx.num_classes, **extra, **score_kw)
        if s.needs_rewind:
            s.snapshot = RewindSnapshot(ctx.early_state)
        rounds = max(1, math.ceil(math.log(1 - level) / math.log(0.5)))
        epochs = ctx.suite.finetune_epochs * (rounds if one_shot else 1)
        fin = ctx.finetuner(epochs, class_dependent=class_dependent)
        common = dict(calib_loader=ctx.loaders["calib"], finetune=fin)
        if rewind:
            backend = _LotteryBackend(model, s, ctx.loaders["val"], ctx.important, rewind_state=ctx.early_state, **common)
        else:
            backend = UnstructuredBackend(model, s, ctx.loaders["val"], ctx.important, **common)
        res = _run(ctx, backend, level, "sparsity", 0.99 if one_shot else 0.5, fn_rule)
        return _finish(ctx, model, res)

    return method


STRUCTURED = {
    "ours_taylor": structured("taylor_signed", False),
    "ours_taylor_fn": structured("taylor_signed", True),
    "ours_magnitude_increase": structured("magnitude_increase", False),
    "ours_magnitude_increase_fn": structured("magnitude_increase", True),
    "tp_magnitude": structured("", False, importance="tp_magnitude"),
    "tp_taylor": structured("", False, importance="tp_taylor"),
}
UNSTRUCTURED = {
    "ours_taylor": unstructured("taylor_signed"),
    "ours_taylor_fn": unstructured("taylor_signed", fn_rule=True),
    "ours_fisher": unstructured("fisher"),
    "ours_fisher_fn": unstructured("fisher", fn_rule=True),
    "ours_magnitude_increase": unstructured("magnitude_increase"),
    "magnitude": unstructured("magnitude"),
    "lottery_ticket": unstructured("magnitude", rewind=True, class_dependent=False),
    "paper_faithful": unstructured("magnitude_increase", rewind=True, class_dependent=True),
    "snip": unstructured("snip", one_shot=True, class_dependent=False),
}
for _table in (STRUCTURED, UNSTRUCTURED):  # *_cal: the same pruned model, then decision calibration
    for _base in ("ours_taylor", "ours_taylor_fn", "ours_magnitude_increase", "ours_magnitude_increase_fn"):
        if _base in _table:
            _table[f"{_base}_cal"] = calibrated(_base, _table)
CLASS_AWARE = {m for t in (STRUCTURED, UNSTRUCTURED) for m in t if m.startswith("ours_")} | {"paper_faithful"}

# The ablation that decides the defaults of the class-dependent Taylor score (omega, normalisation, aggregation).
ABLATION = {
    f"abl_omega{w}_{n}": structured("taylor_signed", False, omega=float(w), normalization=n)
    for w in (1, 2, 4, 8) for n in ("mean", "none")
}
for n in ("mean", "none"):
    ABLATION[f"abl_important_only_{n}"] = structured("taylor_signed", False, omega=1.0, rest_weight=0.0, normalization=n)
    for r in ("sum", "max"):  # channel aggregation over a group's layers (default: mean)
        ABLATION[f"abl_omega4_{n}_{r}"] = structured("taylor_signed", False, omega=4.0, normalization=n, group_reduction=r)
STRUCTURED.update(ABLATION)
CLASS_AWARE.update(k for k in ABLATION if k != "abl_omega1_none")  # omega 1 without normalisation is class-agnostic



# ----------------------------------------------------------------------------- NNI (one shot)
def _nni_prune(ctx: Context, model: nn.Module, ratio: float, pruner_name: str, **pruner_kwargs: Any) -> nn.Module:
    """Filter pruning of every Conv2d at ``sparse_ratio = ratio`` by an NNI pruner, then NNI's speed-up.
    Data-driven pruners see the calibration batches: ClassAwarePruner through ``calib_loader``; TaylorPruner through
    an evaluator whose optimiser has lr 0, so it collects gradients on the same batches without training."""
    import nni

    import classaware_plugin.nni as cnni
    from nni.compression.utils import TorchEvaluator

    model.eval()
    config = [{"op_types": ["Conv2d"], "sparse_ratio": ratio, "granularity": "out_channel"}]
    calib = ctx.loaders["calib"]
    if pruner_name == "ClassAwarePruner":
        pruner = cnni.ClassAwarePruner(model, config, important_classes=ctx.important, calib_loader=calib,
                                       num_classes=ctx.num_classes, **pruner_kwargs)
        _, masks = pruner.compress()
    else:
        cls = cnni.get_pruner_class(pruner_name)
        config = cnni.prepare_config_list(model, config)
        if pruner_name == "TaylorPruner":
            def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
                for batch in calib:
                    optimizers.zero_grad()
                    training_step(batch, model).backward()
                    optimizers.step()

            evaluator = TorchEvaluator(training_func, nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0),
                                       lambda batch, model: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]))
            pruner = cls(model, config, evaluator, training_steps=len(calib))
        else:
            pruner = cls(model, config)
        _, masks = pruner.compress()
        masks = cnni.plain_masks(masks)
    pruner.unwrap_model()
    model.eval()
    cnni.speedup(model, torch.zeros(2, *ctx.input_shape), masks)
    return model


_RATIO_FOR_MACS: dict[tuple, float] = {}


def nni_ratio_for_macs(ctx: Context, reduction: float) -> float:
    """The smallest NNI sparse ratio (uniform over every Conv2d, filters) whose sped-up model reaches
    ``reduction`` x fewer MACs: bisection with L1NormPruner on the dense model (the ratio-to-MACs map depends on
    the architecture only, since every pruner removes the same number of filters per layer)."""
    key = (ctx.suite.model, repr(ctx.suite.model_kwargs), ctx.input_shape, reduction)
    if key not in _RATIO_FOR_MACS:
        ex = torch.zeros(1, *ctx.input_shape)
        dense_macs = count_params_macs(ctx.dense, ex)[1]
        lo, hi = 0.0, 0.95
        for _ in range(9):  # about 0.002 resolution
            mid = (lo + hi) / 2
            pruned = _nni_prune(ctx, copy.deepcopy(ctx.dense), mid, "L1NormPruner")
            if dense_macs / count_params_macs(pruned, ex)[1] >= reduction:
                hi = mid
            else:
                lo = mid
        _RATIO_FOR_MACS[key] = hi
    return _RATIO_FOR_MACS[key]


def structured_steps(reduction: float, step: float = 0.2) -> int:
    """Pruning steps the structured schedule needs to reach ``reduction`` when every layer loses ``step`` of its
    remaining channels per step (MACs of a conv scale with in x out channels)."""
    return max(1, math.ceil(math.log(reduction) / (-2 * math.log(1 - step))))


def nni_one_shot(pruner_name: str, class_dependent: bool = True, **pruner_kwargs: Any):
    """One NNI pruning shot, speed-up, then fine-tuning. In an ``nni`` suite the level is NNI's sparse ratio and the
    fine-tune budget 3 x finetune_epochs; in a ``structured`` suite the level is a MACs reduction, reached by
    :func:`nni_ratio_for_macs`, and the budget is what the iterative methods get for that level
    (:func:`structured_steps` x finetune_epochs)."""

    def method(ctx: Context, level: float) -> tuple[nn.Module, dict[str, Any]]:
        if ctx.suite.regime == "structured":
            ratio, epochs = nni_ratio_for_macs(ctx, level), structured_steps(level) * ctx.suite.finetune_epochs
        else:
            ratio, epochs = level, 3 * ctx.suite.finetune_epochs
        model = _nni_prune(ctx, copy.deepcopy(ctx.dense), ratio, pruner_name, **pruner_kwargs)
        ctx.finetuner(epochs, class_dependent=class_dependent)(model)
        info = {"stop_reason": "one_shot", "attempts": 1, "sparse_ratio": ratio, "finetune_epochs": epochs}
        if ctx.suite.regime != "structured":
            info["reached"] = level
        return model, info

    return method


NNI_METHODS = {
    "nni_classaware": nni_one_shot("ClassAwarePruner", score="taylor_signed"),  # the first score, as in the results
    "nni_classaware_mean": nni_one_shot("ClassAwarePruner", score="taylor_signed", normalization="mean"),
    "nni_l1": nni_one_shot("L1NormPruner"),
    "nni_taylor": nni_one_shot("TaylorPruner"),
}
CLASS_AWARE.update({"nni_classaware", "nni_classaware_mean"})


# ----------------------------------------------------------------------------- issue 10's protocol
# Every method starts from the same cross-entropy-trained dense model per seed, with the same calibration batches,
# step schedule (20% of the remaining channels per step), fine-tuning budget (finetune_epochs per step) and
# fine-tuning seeds. score_only: cross-entropy fine-tuning for all, only the importance differs. pipeline: what a
# TP/NNI user runs today (their estimators, cross-entropy fine-tuning) against our whole pipeline (class-dependent
# fine-tuning loss, Fisher score, FN rule, calibration). fb_*: every score under the same FN-constrained loop
# (how far each gets within the FN budget).
PROTOCOL = {
    "so_fisher": structured("fisher", False, class_dependent=False),
    "so_fisher_margin": structured("fisher", False, class_dependent=False, loss="margin"),
    "so_fisher_agnostic": structured("fisher", False, class_dependent=False, weighting="count"),
    "so_fisher_omega4": structured("fisher", False, class_dependent=False, omega=4.0),  # the important class x4
    "so_taylor_signed": structured("taylor_signed", False, class_dependent=False),
    "so_tp_taylor": structured("", False, importance="tp_taylor", class_dependent=False),
    "so_tp_magnitude": structured("", False, importance="tp_magnitude", class_dependent=False),
    "pl_ours": structured("fisher", True, class_dependent=True, calibration=True),
    # the pipeline as classaware-prune runs it since issue 12 (FN judged at the calibrated operating point), and the
    # same with cross-entropy fine-tuning (does the class-dependent fine-tuning loss help FN at the dense FPR?)
    "pl_ours_calibrated": structured("fisher", True, class_dependent=True, calibration=True,
                                     operating_point="calibrated"),
    "pl_ours_ce": structured("fisher", True, class_dependent=False, calibration=True, operating_point="calibrated"),
    # fine-tuning that also distils the dense model (half cross-entropy, half the soft term at temperature 4): does
    # pulling the pruned model's outputs towards the dense one's keep the important class's FN at the dense FPR? The
    # same fine-tuning under TP's Taylor estimator without the FN rule says how much of it is the distillation alone.
    "pl_ours_kd": structured("fisher", True, class_dependent=False, calibration=True, operating_point="calibrated",
                             distill=0.5),
    "so_tp_taylor_kd": structured("", False, importance="tp_taylor", class_dependent=False, distill=0.5),
    # fine-tuning with logit-adjusted cross-entropy (tau = 1, Menon et al. 2021): the rare class must win by a margin
    # of log(prior ratio) during training, with the gradient scale of plain cross-entropy (class weights multiply it).
    # Our pipeline with it, and TP's Taylor estimator with it (how much of it is the loss alone).
    "pl_ours_la": structured("fisher", True, class_dependent=False, calibration=True, operating_point="calibrated",
                             logit_adjustment=1.0),
    "so_tp_taylor_la": structured("", False, importance="tp_taylor", class_dependent=False, logit_adjustment=1.0),
    # cross-entropy fine-tuning plus the ranking term alone (no class weights: they move the argmax threshold, which
    # FN at the dense FPR does not reward), over the full AUC and over FPR <= 10% only (the hardest tenth of each
    # batch's negatives; a rare class's dense operating point lies at a low FPR, 0.1-0.4% on Fashion-MNIST).
    "pl_ours_rank": structured("fisher", True, class_dependent=False, calibration=True, operating_point="calibrated",
                               ranking=1.0),
    "pl_ours_pauc": structured("fisher", True, class_dependent=False, calibration=True, operating_point="calibrated",
                               ranking=0.1),
    # the same schedule with no fine-tuning, only BatchNorm statistics re-estimated after each step: which channels
    # each score keeps, before cross-entropy fine-tuning re-learns features (does the score protect the important
    # class, and does fine-tuning then erase a difference the score_only comparison does not show?)
    "nf_fisher": structured("fisher", False, finetune=False),
    "nf_tp_taylor": structured("", False, importance="tp_taylor", finetune=False),
    "nf_tp_magnitude": structured("", False, importance="tp_magnitude", finetune=False),
    "fb_fisher": structured("fisher", True, class_dependent=False),
    "fb_tp_taylor": structured("", True, importance="tp_taylor", class_dependent=False),
    "fb_tp_magnitude": structured("", True, importance="tp_magnitude", class_dependent=False),
}
STRUCTURED.update(PROTOCOL)
NNI_METHODS.update({
    "pl_nni_l1": nni_one_shot("L1NormPruner", class_dependent=False),
    "pl_nni_taylor": nni_one_shot("TaylorPruner", class_dependent=False),
})
CLASS_AWARE.update({"so_fisher", "so_fisher_margin", "so_fisher_omega4", "so_taylor_signed", "pl_ours",
                    "pl_ours_calibrated", "pl_ours_ce", "pl_ours_kd", "pl_ours_la", "pl_ours_rank", "pl_ours_pauc",
                    "fb_fisher", "nf_fisher"})
# The same score-only comparison for unstructured pruning (cross-entropy fine-tuning for every score).
UNSTRUCTURED.update({
    "so_fisher": unstructured("fisher", class_dependent=False),
    "so_fisher_margin": unstructured("fisher", class_dependent=False, loss="margin"),
    "so_fisher_agnostic": unstructured("fisher", class_dependent=False, weighting="count"),
    "so_fisher_omega4": unstructured("fisher", class_dependent=False, omega=4.0),
    "so_magnitude": unstructured("magnitude", class_dependent=False),
    "so_taylor_signed": unstructured("taylor_signed", class_dependent=False),
})
