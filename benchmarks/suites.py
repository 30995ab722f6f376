"""The protocol: which data, models, methods, compression levels and seeds each suite runs."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class DataSpec:
    name: str                      # classaware_plugin.data name
    important: tuple[int, ...]
    keep_fraction: float           # of the important classes' training samples
    kwargs: dict = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    data: DataSpec
    model: str
    model_kwargs: dict
    regime: str                    # structured | unstructured | nni (structured, one shot at a sparse ratio)
    levels: tuple[float, ...]      # MACs reduction (structured) or sparsity (unstructured)
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    dense_epochs: float
    finetune_epochs: float         # per pruning step; every method has the same schedule and budget
    lr: float = 2e-3
    rank_weight: float = 1.0
    batch_size: int = 128
    dense_loss: str = "class_dependent"   # class_dependent | ce (the model a TP/NNI user arrives with)
    dense_schedule: str = "constant"       # constant | cosine (learning rate over the dense training)
    weight_decay: float = 0.0
    finetune_lr: float | None = None       # per fine-tuning call; None = lr / 2
    finetune_schedule: str = "constant"
    calib_batches: int = 8


FASHION = DataSpec("fashion_mnist", (6,), 0.1, {"train_limit": 12000}, "Fashion-MNIST, Shirt rare (10%), 12k train")
DIGITS = DataSpec("digits", (3,), 0.2, {"image_size": 16}, "digits 16x16, '3' rare (20%)")
CANCER = DataSpec("breast_cancer", (0,), 0.5, {}, "breast cancer, malignant important (50% kept)")

ABLATION_METHODS = tuple(f"abl_omega{w}_{n}" for w in (1, 2, 4, 8) for n in ("mean", "none")) + tuple(
    m for n in ("mean", "none") for m in (f"abl_important_only_{n}", f"abl_omega4_{n}_sum", f"abl_omega4_{n}_max"))
# A *_cal method reuses its base method's pruned model, so it comes after it.
STRUCTURED_METHODS = ("ours_taylor", "ours_taylor_fn", "ours_taylor_cal", "ours_taylor_fn_cal", "ours_magnitude_increase",
                      "tp_magnitude", "tp_taylor", "nni_classaware", "nni_l1", "nni_taylor", "ours_magnitude_increase_fn",
                      "ours_magnitude_increase_cal", "ours_magnitude_increase_fn_cal")
UNSTRUCTURED_METHODS = ("ours_taylor", "ours_taylor_fn", "magnitude", "lottery_ticket", "paper_faithful", "snip",
                        "ours_taylor_cal", "ours_taylor_fn_cal", "ours_magnitude_increase", "ours_magnitude_increase_cal")

SUITES: dict[str, Suite] = {
    # Issue 3's comparison: the three Torch-Pruning estimators at 2x MACs, 3 seeds.
    "tp_fashion": Suite("tp_fashion", FASHION, "cifar_resnet", {"depth": 8, "width": 16}, "structured", (2.0,),
                        ("ours_taylor", "tp_taylor", "tp_magnitude"), (0, 1, 2), dense_epochs=6, finetune_epochs=1.0),
    # Issue 4's comparison: NNI pruners at the same sparse ratio (filters of every conv), 3 seeds.
    "nni_fashion": Suite("nni_fashion", FASHION, "cifar_resnet", {"depth": 8, "width": 16}, "nni", (0.5,),
                         ("nni_classaware", "nni_classaware_mean", "nni_l1", "nni_taylor"), (0, 1, 2), dense_epochs=6,
                         finetune_epochs=1.0),
    # The ablation of the score's defaults (structured, 2x MACs).
    "digits_ablation": Suite("digits_ablation", DIGITS, "cifar_resnet", {"depth": 8, "width": 16}, "structured", (2.0,),
                             ABLATION_METHODS, (0, 1, 2), dense_epochs=15, finetune_epochs=1.0, batch_size=64),
    "fashion_ablation": Suite("fashion_ablation", FASHION, "cifar_resnet", {"depth": 8, "width": 16}, "structured",
                              (2.0,), ("abl_omega1_none", "abl_omega1_mean", "abl_omega4_mean", "abl_omega4_none",
                                       "abl_important_only_mean", "abl_omega4_mean_sum", "abl_omega2_none",
                                       "abl_omega8_none", "abl_important_only_none", "abl_omega4_none_sum",
                                       "abl_omega4_none_max"), (0, 1, 2),
                              dense_epochs=6, finetune_epochs=1.0),
    "fashion_structured": Suite("fashion_structured", FASHION, "cifar_resnet", {"depth": 8, "width": 16}, "structured",
                                (1.5, 2.0, 3.0), STRUCTURED_METHODS, (0, 1, 2), dense_epochs=6, finetune_epochs=1.0),
    # MobileNetV2 at 2x only, without the FN rule: one run takes 3-5 minutes on this machine (see the README).
    "fashion_mobilenet": Suite("fashion_mobilenet", FASHION, "mobilenet_v2", {"width_mult": 0.35}, "structured",
                               (2.0,), ("ours_taylor", "tp_magnitude", "tp_taylor"), (0, 1, 2),
                               dense_epochs=4, finetune_epochs=0.5),
    "cancer_unstructured": Suite("cancer_unstructured", CANCER, "mlp", {"hidden": (64, 32)}, "unstructured",
                                 (0.8, 0.9, 0.95, 0.98, 0.99), UNSTRUCTURED_METHODS, (0, 1, 2), dense_epochs=60,
                                 finetune_epochs=10, lr=3e-3, batch_size=32),
    "digits_structured": Suite("digits_structured", DIGITS, "cifar_resnet", {"depth": 8, "width": 16}, "structured",
                               (1.5, 2.0, 3.0), STRUCTURED_METHODS, (0, 1, 2), dense_epochs=15, finetune_epochs=1.0,
                               batch_size=64),
    "digits_unstructured": Suite("digits_unstructured", DIGITS, "cifar_resnet", {"depth": 8, "width": 16}, "unstructured",
                                 (0.8, 0.9, 0.95, 0.98, 0.99), UNSTRUCTURED_METHODS, (0, 1, 2), dense_epochs=15,
                                 finetune_epochs=1.0, batch_size=64),
}

# Issue 10's protocol: a properly trained dense model (plain cross-entropy, the model a TP/NNI user arrives with),
# >= 20k training images, 5 paired seeds, FN at the dense model's FPR; two comparisons kept apart (see methods.py).
FASHION_20K = DataSpec("fashion_mnist", (6,), 0.1, {"train_limit": 25000},
                       "Fashion-MNIST, Shirt rare (10%), 20.2k train")
COMPARISONS = {
    # comparison -> (our method, the class-agnostic methods it is compared with; the best of them is the baseline)
    "score_only": ("so_fisher", ("so_tp_taylor", "so_tp_magnitude", "so_magnitude")),
    "pipeline": ("pl_ours", ("so_tp_taylor", "so_tp_magnitude", "pl_nni_l1", "pl_nni_taylor")),
    # the score_only schedule with no fine-tuning: the score's choice of channels alone (a diagnostic)
    "no_finetune": ("nf_fisher", ("nf_tp_taylor", "nf_tp_magnitude")),
}
NO_FINETUNE = (COMPARISONS["no_finetune"][0], *COMPARISONS["no_finetune"][1])  # its methods, for the suites
# Variants of one method that differ in one thing -> the method they are measured against (paired, same seeds): the
# fine-tuning loss (class-dependent vs cross-entropy), distillation, logit adjustment, the ranking term. summarize.py
# adds the paired difference of each to its reference (``paired_reference``) and a table of them to headline.md.
VARIANTS = {
    "pl_ours_ce": "pl_ours",
    "pl_ours_kd": "pl_ours_ce",
    "so_tp_taylor_kd": "so_tp_taylor",
    "pl_ours_la": "pl_ours_ce",
    "so_tp_taylor_la": "so_tp_taylor",
    "pl_ours_rank": "pl_ours_ce",
    "pl_ours_pauc": "pl_ours_rank",
}
PROTOCOL_METHODS = ("so_fisher", "so_tp_taylor", "so_tp_magnitude", "pl_ours", "pl_nni_l1", "so_fisher_margin",
                    "so_fisher_agnostic", "pl_nni_taylor", "so_taylor_signed", "fb_fisher", "fb_tp_taylor",
                    "fb_tp_magnitude", "pl_ours_calibrated", "pl_ours_ce", "so_fisher_omega4", "pl_ours_kd",
                    "so_tp_taylor_kd", "pl_ours_la", "so_tp_taylor_la", "pl_ours_rank", "pl_ours_pauc") + NO_FINETUNE
SUITES["fashion_protocol"] = Suite(
    "fashion_protocol", FASHION_20K, "cifar_resnet", {"depth": 8, "width": 16}, "structured", (2.0, 3.0),
    PROTOCOL_METHODS, (0, 1, 2, 3, 4), dense_epochs=15, finetune_epochs=1.0,
    lr=3e-3, dense_loss="ce", dense_schedule="cosine", weight_decay=5e-4, finetune_lr=5e-4,
    finetune_schedule="cosine")

# The same score-only comparison on the two other data sets (cheap: seconds per run), to judge the score's defaults
# on more than one suite: digits (structured) and breast cancer (MLP, unstructured).
SCORE_VARIANTS = ("so_fisher", "so_fisher_agnostic", "so_fisher_margin", "so_fisher_omega4")
SUITES["digits_protocol"] = Suite(
    "digits_protocol", DIGITS, "cifar_resnet", {"depth": 8, "width": 16}, "structured", (2.0, 3.0),
    SCORE_VARIANTS + ("so_tp_taylor", "so_tp_magnitude", "pl_ours", "pl_ours_ce", "pl_ours_kd", "so_tp_taylor_kd",
                      "pl_ours_la", "so_tp_taylor_la", "pl_ours_rank", "pl_ours_pauc") + NO_FINETUNE,
    (0, 1, 2, 3, 4), dense_epochs=15,
    finetune_epochs=1.0,
    batch_size=64, lr=3e-3, dense_loss="ce", dense_schedule="cosine", weight_decay=5e-4, finetune_lr=5e-4,
    finetune_schedule="cosine")
SUITES["cancer_protocol"] = Suite(
    "cancer_protocol", CANCER, "mlp", {"hidden": (64, 32)}, "unstructured", (0.9, 0.95, 0.98),
    SCORE_VARIANTS + ("so_magnitude",), (0, 1, 2, 3, 4), dense_epochs=60, finetune_epochs=10, lr=3e-3,
    batch_size=32, dense_loss="ce", dense_schedule="cosine", weight_decay=5e-4, finetune_lr=1e-3,
    finetune_schedule="cosine")
# Issue 10's remaining levels: unstructured ResNet-8 at 90/95/98% (the same dense models as digits_protocol: the
# dense settings are identical, so the cache is shared), and MobileNetV2 at 2x/3x MACs. Two fine-tuning epochs per
# step for the unstructured suite: digits has 1.2k training images (19 batches an epoch), and with one epoch per step
# the old digits_unstructured suite fell to 42-74% accuracy at 95-98%, where FN says little. MobileNetV2 (width 0.5,
# 30 dense epochs: 94.2% test accuracy on seed 0) recovers far less per fine-tuning step than ResNet-8: with
# ResNet-8's 1 epoch at 5e-4 per step it fell to 37% / 22% accuracy at 2x / 3x (TP magnitude, seed 0), with 10
# epochs 78% / 67%, with 3 epochs at 2e-3 84% / 73% (Fisher 92% / 84%); the last is used (a fine-tuning budget that
# leaves a usable model).
SUITES["digits_unstructured_protocol"] = Suite(
    "digits_unstructured_protocol", DIGITS, "cifar_resnet", {"depth": 8, "width": 16}, "unstructured", (0.9, 0.95, 0.98),
    SCORE_VARIANTS + ("so_magnitude",), (0, 1, 2, 3, 4), dense_epochs=15, finetune_epochs=2.0,
    batch_size=64, lr=3e-3, dense_loss="ce", dense_schedule="cosine", weight_decay=5e-4, finetune_lr=5e-4,
    finetune_schedule="cosine")
SUITES["digits_mobilenet_protocol"] = Suite(
    "digits_mobilenet_protocol", DIGITS, "mobilenet_v2", {"width_mult": 0.5}, "structured", (2.0, 3.0),
    ("so_fisher", "so_tp_taylor", "so_tp_magnitude", "pl_ours", "pl_ours_ce"), (0, 1, 2, 3, 4), dense_epochs=30,
    finetune_epochs=3.0, batch_size=64, lr=3e-3, dense_loss="ce", dense_schedule="cosine", weight_decay=5e-4,
    finetune_lr=2e-3, finetune_schedule="cosine")
# MobileNetV2 on the Fashion-MNIST protocol (issue 10's remaining level): fashion_protocol's data, dense budget (15
# cosine epochs, cross-entropy) and fine-tuning budget (1 epoch per step: 20.2k images are 158 batches, against
# digits' 19), with digits_mobilenet_protocol's model (width 0.5, stride-1 stem) and fine-tuning learning rate (2e-3:
# MobileNetV2 recovered far less than ResNet-8 at 5e-4 there). Score only (and the no_finetune diagnostic): the
# dense model takes about 28 min of one thread and a pruning run 3-5 min (MobileNetV2 costs 3.5x ResNet-8 per image).
SUITES["fashion_mobilenet_protocol"] = replace(
    SUITES["fashion_protocol"], name="fashion_mobilenet_protocol", model="mobilenet_v2",
    model_kwargs={"width_mult": 0.5}, finetune_lr=2e-3,
    methods=("so_fisher", "so_tp_taylor", "so_tp_magnitude") + NO_FINETUNE)

# The loss ablation: the same digits protocol from dense models trained with the class-dependent loss (the paper's
# dense training) instead of plain cross-entropy; everything after the dense model is unchanged.
SUITES["digits_protocol_cdl"] = replace(SUITES["digits_protocol"], name="digits_protocol_cdl",
                                        dense_loss="class_dependent",
                                        methods=("so_fisher", "so_tp_taylor", "so_tp_magnitude", "pl_ours"))
# The same loss ablation on Fashion-MNIST, score only (a Fashion-MNIST dense model takes about 16 min of one thread,
# each pruning run 3 min; the FN rule's runs twice that).
SUITES["fashion_protocol_cdl"] = replace(SUITES["fashion_protocol"], name="fashion_protocol_cdl",
                                         dense_loss="class_dependent",
                                         methods=("so_fisher", "so_tp_taylor", "so_tp_magnitude"))
# Beyond issue 10's levels: the score-only comparison at 5x and 10x MACs, on the same dense models (their settings are
# identical, so the cache is shared). Hypothesis: at 2x / 3x fine-tuning recovers whatever channels a score removed
# (before fine-tuning Fisher is level with TP magnitude), so the choice of channels may only show where few are left.
HIGH_METHODS = ("so_fisher", "so_tp_taylor", "so_tp_magnitude")
SUITES["fashion_protocol_high"] = replace(SUITES["fashion_protocol"], name="fashion_protocol_high", levels=(5.0, 10.0),
                                          methods=HIGH_METHODS)
SUITES["digits_protocol_high"] = replace(SUITES["digits_protocol"], name="digits_protocol_high", levels=(5.0, 10.0),
                                         methods=HIGH_METHODS)
LOSS_ABLATION = {"fashion_protocol": "fashion_protocol_cdl", "digits_protocol": "digits_protocol_cdl"}
"""A suite whose dense models are trained with cross-entropy -> its twin trained with the class-dependent loss."""

QUICK = {
    "digits_protocol": dict(levels=(2.0,), seeds=(0,)),
    "digits_structured": dict(levels=(2.0,), seeds=(0,)),
    "cancer_unstructured": dict(levels=(0.9, 0.98), seeds=(0,)),
    "digits_unstructured": dict(levels=(0.9,), seeds=(0,), methods=("ours_taylor", "magnitude", "snip")),
}
FULL = ("fashion_protocol", "digits_protocol", "cancer_protocol", "digits_unstructured_protocol",
        "digits_mobilenet_protocol", "fashion_mobilenet_protocol", "digits_protocol_cdl", "fashion_protocol_cdl",
        "fashion_protocol_high", "digits_protocol_high", "fashion_structured",
        "fashion_mobilenet", "nni_fashion", "fashion_ablation", "digits_ablation", "cancer_unstructured",
        "digits_structured", "digits_unstructured")
