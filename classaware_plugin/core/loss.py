"""The class-dependent loss of Entezari & Saukh: weighted cross-entropy plus a ranking surrogate of AUC.

L = L_wCE + rank_weight * L_rank, where L_wCE is cross-entropy with per-class weights gamma_c (optionally on
logits adjusted by ``tau * log(prior)``, Menon et al., ICLR 2021) and L_rank is, for each important class c, the
mean over pairs (i positive, j negative) in the batch of ``max(0, margin - (s_i - s_j))**2`` with
``s = logit_c - logsumexp(other logits)``; with ``rank_max_fpr`` < 1 only the batch's highest-scoring negatives
take part (a one-way partial-AUC surrogate for FPR <= rank_max_fpr).
The paper's Eq. 3 carries a sign typo (it rewards ranking negatives above positives); this is the
corrected form.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .validation import (
    ClassAwareError, Constraint, Interval, check_choice, check_important_classes, check_labels, check_number,
    check_num_classes, check_number_list, check_params,
)

WEIGHT_SCHEMES = ("balanced", "inverse", "none")


def make_class_weights(
    class_counts: Sequence[int],
    scheme: str = "balanced",
    beta: float = 0.99997,
) -> torch.Tensor:
    """Per-class weights normalised to mean 1.

    ``'balanced'`` is Cui et al. (2019): gamma_c proportional to (1 - beta) / (1 - beta**n_c);
    ``'inverse'`` is proportional to 1 / n_c; ``'none'`` gives ones.

    >>> [round(w, 3) for w in make_class_weights([90, 10], "inverse").tolist()]
    [0.2, 1.8]
    """
    check_choice("scheme", scheme, WEIGHT_SCHEMES)
    counts = torch.as_tensor(check_number_list("class_counts", class_counts, integer=True, min_len=2),
                             dtype=torch.float64)
    if (counts <= 0).any():
        raise ClassAwareError(
            f"The 'class_counts' parameter must hold positive counts (a class with no training sample "
            f"cannot be weighted). Got {counts.long().tolist()!r}."
        )
    if scheme == "none":
        w = torch.ones_like(counts)
    elif scheme == "inverse":
        w = 1.0 / counts
    else:
        check_number("beta", beta, low=0.0, high=1.0, low_open=True, high_open=True)
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    w = w / w.mean()
    return w.float()


def important_class_score(logits: torch.Tensor, cls: int) -> torch.Tensor:
    """Score of class ``cls``: its logit minus the log-sum-exp of the other logits (log-odds)."""
    others = torch.cat([logits[:, :cls], logits[:, cls + 1 :]], dim=1)
    return logits[:, cls] - torch.logsumexp(others, dim=1)


def pairwise_ranking_loss(scores: torch.Tensor, positive: torch.Tensor, margin: float = 1.0,
                          max_fpr: float = 1.0) -> torch.Tensor | None:
    """Mean squared hinge ``max(0, margin - (s_i - s_j))**2`` over (positive i, negative j) pairs.

    ``max_fpr`` < 1 keeps only the ``ceil(max_fpr * n_negatives)`` negatives with the highest scores: the empirical
    CVaR estimator of the one-way partial AUC over FPR in ``[0, max_fpr]`` (Zhu et al., "When AUC meets DRO",
    ICML 2022), which is the part of the ROC curve where a rare class's operating point lies. Returns ``None`` when
    the batch has no positive or no negative sample (no pair to rank).

    >>> s = torch.tensor([2.0, 0.5, 1.8, -3.0, -4.0])
    >>> round(pairwise_ranking_loss(s, torch.tensor([True, True, False, False, False]), max_fpr=1 / 3).item(), 4)
    2.965
    """
    pos = scores[positive]
    neg = scores[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    if max_fpr < 1.0:
        neg = torch.topk(neg, max(1, math.ceil(max_fpr * neg.numel()))).values
    diff = pos[:, None] - neg[None, :]
    return torch.clamp(margin - diff, min=0.0).pow(2).mean()


class ClassDependentLoss(nn.Module):
    """Class-weighted cross-entropy plus a squared-hinge AUC surrogate for the important classes.

    Args:
        important_classes: indices of the classes whose false negatives matter.
        class_counts: training count of every class; needed by the ``'balanced'`` and ``'inverse'``
            schemes and fixes the number of classes.
        class_weights: ``'balanced'`` (Cui et al., with ``beta``), ``'inverse'``, ``'none'`` or an
            explicit sequence of one weight per class.
        beta: the class-balanced parameter (paper: 0.99997).
        rank_weight: lambda, the weight of the ranking term (paper: 5). 0 disables it.
        margin: the hinge margin of the ranking term.
        num_classes: number of classes, when neither ``class_counts`` nor explicit weights give it.
        rank_max_fpr: the ranking term compares each positive with the hardest ``rank_max_fpr`` fraction of the
            batch's negatives (a partial-AUC surrogate for FPR <= rank_max_fpr; see :func:`pairwise_ranking_loss`).
            1 (default, the paper's) compares it with every negative.
        logit_adjustment: tau of the logit-adjusted cross-entropy (Menon et al., "Long-tail learning via logit
            adjustment", ICLR 2021): the cross-entropy sees ``logits + tau * log(prior)`` with the training prior
            from ``class_counts``, so a rare class must win by a larger margin during training; the model's own
            logits are unchanged at inference. 0 (default) disables it; 1 is the paper's value. The ranking term
            always sees the unadjusted logits.

    The cross-entropy is PyTorch's weighted mean (divided by the sum of the targets' weights). The
    ranking term is averaged over the important classes that have both positives and negatives in
    the batch; a batch with none contributes no ranking term (not NaN). ``warmup = True`` uses unit
    class weights (the paper's first round) and leaves the ranking term on.

    Example:
        >>> loss = ClassDependentLoss(important_classes=[1], class_counts=[900, 100])
        >>> value = loss(torch.randn(8, 2), torch.tensor([0, 1] * 4))
    """

    PARAMETERS: dict[str, Constraint] = {
        "rank_weight": Interval(0.0), "margin": Interval(0.0), "logit_adjustment": Interval(0.0),
        "rank_max_fpr": Interval(0.0, 1.0, low_open=True),
    }

    def __init__(
        self,
        important_classes: Sequence[int],
        class_counts: Sequence[int] | None = None,
        class_weights: str | Sequence[float] = "balanced",
        beta: float = 0.99997,
        rank_weight: float = 5.0,
        margin: float = 1.0,
        num_classes: int | None = None,
        logit_adjustment: float = 0.0,
        rank_max_fpr: float = 1.0,
    ) -> None:
        super().__init__()
        check_params(self.PARAMETERS, {"rank_weight": rank_weight, "margin": margin,
                                       "logit_adjustment": logit_adjustment, "rank_max_fpr": rank_max_fpr})
        if class_counts is not None:
            class_counts = check_number_list("class_counts", class_counts, integer=True, min_len=2)
        if num_classes is not None:
            check_num_classes(num_classes)
        if logit_adjustment and class_counts is None:
            raise ClassAwareError(
                f"The 'class_counts' parameter is required by logit_adjustment={logit_adjustment!r} (the adjustment "
                f"is tau * log of the training prior). Got None."
            )
        if isinstance(class_weights, str):
            check_choice("class_weights", class_weights, WEIGHT_SCHEMES)
            if class_weights == "none" and class_counts is None:
                if num_classes is None:
                    raise ClassAwareError(
                        "The 'num_classes' parameter is required when class_weights='none' and no class_counts are given."
                    )
                weights = torch.ones(int(num_classes))
            else:
                if class_counts is None:
                    raise ClassAwareError(
                        f"The 'class_counts' parameter is required by class_weights={class_weights!r}. Got None."
                    )
                weights = make_class_weights(class_counts, class_weights, beta)
        else:
            try:
                values = check_number_list("class_weights", class_weights, min_len=2)
            except ClassAwareError as e:
                raise ClassAwareError(f"{e} It must be 'balanced', 'inverse', 'none' or one non-negative finite weight "
                                      "per class.") from None
            weights = torch.as_tensor(values, dtype=torch.float32)
        n = weights.numel()
        for other, label in ((num_classes, "num_classes"), (None if class_counts is None else len(class_counts), "class_counts")):
            if other is not None and other != n:
                raise ClassAwareError(
                    f"The 'class_weights' parameter has {n} entries but '{label}' says {other} classes."
                )
        self.num_classes = n
        self.important_classes = check_important_classes(important_classes, n)
        self.rank_weight = float(rank_weight)
        self.margin = float(margin)
        self.logit_adjustment = float(logit_adjustment)
        self.rank_max_fpr = float(rank_max_fpr)
        self.warmup = False
        self.register_buffer("weight", weights)
        if self.logit_adjustment:
            counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
            if (counts <= 0).any():
                raise ClassAwareError(
                    f"The 'class_counts' parameter must hold positive counts for logit_adjustment (log of a zero "
                    f"prior). Got {counts.long().tolist()!r}."
                )
            offset = self.logit_adjustment * torch.log(counts / counts.sum())
        else:
            offset = torch.zeros(n, dtype=torch.float64)
        self.logit_offset = offset.float()  # not a buffer: the loss's state_dict stays as it was

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ClassAwareError(
                f"The 'logits' (model output) must have shape (batch, {self.num_classes}). Got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}."
            )
        check_labels("target", target, len(logits), self.num_classes)
        weight = None if self.warmup else self.weight.to(logits.device, logits.dtype)
        adjusted = logits + self.logit_offset.to(logits.device, logits.dtype) if self.logit_adjustment else logits
        loss = F.cross_entropy(adjusted, target, weight=weight)
        if self.rank_weight == 0.0:
            return loss
        terms = []
        for c in self.important_classes:
            term = pairwise_ranking_loss(important_class_score(logits, c), target == c, self.margin,
                                         self.rank_max_fpr)
            if term is not None:
                terms.append(term)
        if terms:
            loss = loss + self.rank_weight * torch.stack(terms).mean()
        return loss

    def extra_repr(self) -> str:
        return (
            f"important_classes={self.important_classes}, rank_weight={self.rank_weight}, "
            f"margin={self.margin}, rank_max_fpr={self.rank_max_fpr}, logit_adjustment={self.logit_adjustment}, "
            f"warmup={self.warmup}"
        )
