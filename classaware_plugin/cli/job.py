"""The main job: data -> dense model -> dense metrics -> FN-constrained pruning -> calibration -> export -> report.

Every stage writes its result atomically into the run directory; the pruning loop writes a checkpoint after
every attempt. ``resume`` picks up from the last completed stage or attempt (after a kill -9 too), and because
every fine-tuning attempt is seeded from (seed, attempt number) a resumed run reaches the same history as an
uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..core.validation import ClassAwareError
from ..core import distributed
from ..core.calibration import calibrate
from ..core.controller import FNConstrainedPruning, FNConstraint, StepRecord
from ..core.guarantee import FNGuarantee, guarantee_sentence, split_for_certification
from ..core.loss import ClassDependentLoss
from ..core.metrics import Evaluation, evaluate_predictions, fn_at_fpr, fpr_of, predict
from ..core.training import Distillation, EarlyStopping, recalibrate_batchnorm, train
from ..backends import create_backend, width_search
from ..core.allocation import accuracy_objective, important_class_auc_objective, important_class_objective
from ..data import DATASETS, DataBundle, labels_of, load_dataset
from ..export import atomic_save, atomic_write_text, cpu_copy, export_onnx, leftover_temp_files, save_model
from ..files import CheckpointError, load_checkpoint, load_model, load_object
from ..models import build_model, check_output_width
from ..speed import LatencyProbe, latency_ms, speedup
from ..measure import count_params_macs
from .config import make_constraint, score_config, validate
from .lock import LOCK

log = logging.getLogger(__name__)

STATE = "state.pt"
ALLOCATION = "allocation.json"
"""The searched per-layer widths (``pruning.allocation: search``)."""
SEARCH = "search.json"
"""The width search's state after every candidate (deleted once ``allocation.json`` is written)."""
DENSE_TRAINING = "dense_training.pt"
"""The dense training's checkpoint at its last epoch boundary (deleted once ``dense.pt`` is written)."""
STAGES = ("pruning", "pruned", "calibrated", "done")
"""The stages a run state records (``state.pt``): after each pruning attempt, after the loop, after calibration."""


def load_data(cfg: dict[str, Any]) -> tuple[DataBundle, list[int]]:
    """The data bundle and the important classes resolved to indices (names allowed)."""
    d = cfg["data"]
    name = d["name"]
    kw: dict[str, Any] = {"seed": cfg["seed"], "keep_fraction": d["keep_fraction"]}
    # the configuration keys the data set's loader reads (null: the loader's own default)
    kw.update({arg: d[key] for key, arg in DATASETS[name].config.items() if d[key] is not None})
    # Names are resolved against the data set's class names, which need the data set: load once without rarity.
    given = cfg["important_classes"]
    probe = load_dataset(name, **{**kw, "keep_fraction": 1.0, "important": []}) if any(
        isinstance(c, str) for c in given) else None
    try:
        important = [probe.class_index(c) if isinstance(c, str) and probe is not None else int(c) for c in given]
        bundle = load_dataset(name, important=important, **kw)  # checks the indices against the classes it finds
    except ClassAwareError as e:
        raise ClassAwareError(f"The configuration key 'important_classes' holds {given!r}: {e}") from None
    return bundle, important


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    """``config.yaml``: the run's whole configuration, which ``--resume`` (and ``--nproc``'s processes) read back."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def model_modules(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The top-level package a ``package.module:callable`` model name imports (its classes may be loaded)."""
    name = cfg["model"]["name"]
    return (name.partition(":")[0].split(".")[0] + ".",) if ":" in name else ()


def loaders(bundle: DataBundle, cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's loaders: train (shuffled by a generator seeded from ``seed``), val, test, and calib, a fixed
    calibration subset (the first batches of a seeded permutation: the same every step and on resume). Under the
    certified rule validation is cut in two (stratified, seeded): ``val``, the selection split that early stopping,
    the budget, the calibration shift and the accuracy guard read, and ``cert``, which only the certification reads.

    Under torch.distributed each rank gets its share (:func:`~classaware_plugin.core.distributed.shard_loader`):
    training batches of ``batch_size / processes`` whose union is the one-process batch, and validation, test and
    calibration samples split without repeats (the metrics and statistics, gathered over ranks, are exact)."""
    bs = cfg["data"]["batch_size"]
    train_dl, val_dl, test_dl = bundle.loaders(bs, seed=cfg["seed"])
    perm = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    n = min(len(bundle.train), bs * cfg["pruning"]["calib_batches"])
    calib = DataLoader(Subset(bundle.train, perm[:n].tolist()), batch_size=bs)
    dl = {"train": train_dl, "calib": calib, "val": val_dl, "test": test_dl}
    c = cfg["constraint"]
    if c["rule"] == "certified":  # val: the selection split, which chooses everything; cert: the test alone reads it
        dl["val"], dl["cert"] = split_for_certification(val_dl, c["certification_fraction"], seed=cfg["seed"])
    return {k: distributed.shard_loader(v, train=k == "train") for k, v in dl.items()}


def make_loss(cfg: dict[str, Any], bundle: DataBundle, important: list[int]) -> ClassDependentLoss:
    t = cfg["training"]
    return ClassDependentLoss(
        important, class_counts=bundle.train_counts, class_weights=t["class_weights"], rank_weight=t["rank_weight"],
        logit_adjustment=t["logit_adjustment"], rank_max_fpr=t["rank_max_fpr"],
    )


def summarise(model: nn.Module, ev: Evaluation, example: torch.Tensor, macs: int | None = None) -> dict[str, Any]:
    """A model's test metrics and cost; the latency is measured on the CPU (batch 1, PyTorch)."""
    model = cpu_copy(model)
    params, counted = count_params_macs(model, example)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    d = ev.to_dict()
    return {
        "params": params, "nonzero_params": params - zeros, "macs": macs if macs is not None else counted,
        "accuracy": ev.accuracy, "fn": d["fn"], "fp": d["fp"], "auc": d["auc"], "ap": d["ap"],
        "recall": d["recall"], "support": d["support"], "confusion": d["confusion"],
        "latency_ms": latency_ms(model, example[:1]),
    }


Predictions = tuple[np.ndarray, np.ndarray]


def operating_points(val: Predictions, test: Predictions, important: list[int], dense_val: Evaluation) -> dict[str, Any]:
    """Per important class: test FN at the dense model's validation false-positive rate (threshold on validation).
    ``val`` and ``test`` are a model's ``(labels, logits)`` (:func:`predict`), computed once per split."""
    return {str(c): fn_at_fpr(val, test, c, fpr_of(dense_val, c)).to_dict() for c in important}


class Job:
    """One run of ``classaware-prune run`` in ``run_dir``."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path, progress: bool = True, trusted: bool = False) -> None:
        validate(cfg)
        self.cfg = cfg
        self.dir = run_dir
        self.progress = progress
        self.trusted = trusted  # --trust-checkpoint: unpickle files in full (see classaware_plugin.files)
        self.device = distributed.resolve_device(cfg["device"])
        # Under torch.distributed every rank runs every stage (the collectives need them all); rank 0 alone writes.
        self.main = distributed.is_main()

    def _exists(self, path: Path) -> bool:
        """Whether ``path`` exists, as rank 0 sees it (every rank then takes the same branch)."""
        return bool(distributed.broadcast_object(path.exists()))

    def _save(self, obj: Any, path: Path) -> None:
        if self.main:
            atomic_save(obj, path)

    def _save_model(self, model: nn.Module, path: Path) -> None:
        if self.main:
            save_model(model, path)

    def _write_text(self, path: Path, text: str) -> None:
        if self.main:
            atomic_write_text(path, text)

    def _unlink(self, path: Path) -> None:
        if self.main:
            path.unlink(missing_ok=True)

    def _load(self, path: Path, what: str) -> Any:
        """A file of this run or the user's checkpoint, read safely unless the user trusts it; classes of the
        package that ``model.name`` imports are allowed (the configuration already runs its code)."""
        return load_object(path, what=what, trusted=self.trusted, allow_modules=model_modules(self.cfg))

    def _run_state(self) -> dict[str, Any] | None:
        path = self.dir / STATE
        if not self._exists(path):
            return None
        state = self._load(path, "run state")
        if not (isinstance(state, dict) and state.get("stage") in STAGES and isinstance(state.get("model"), nn.Module)):
            raise CheckpointError(
                f"The run state {str(path)!r} was not written by this job (expected a dict with 'stage' in {STAGES} and "
                f"a 'model'). Delete it to restart pruning from the dense model, or start a new run."
            )
        return state

    def _load_model(self, path: Path) -> nn.Module:
        return load_model(path, trusted=self.trusted, allow_modules=model_modules(self.cfg)).to(self.device)

    # ----------------------------------------------------------------- stages
    def dense_model(self, bundle: DataBundle, important: list[int], dl: dict[str, Any]) -> nn.Module:
        path = self.dir / "dense.pt"
        if self._exists(path):
            log.info("using the cached dense model %s", path)
            self._unlink(self.dir / DENSE_TRAINING)  # of a run killed between the two lines below
            return self._load_model(path)
        m = self.cfg["model"]
        if m["checkpoint"]:
            model = load_checkpoint(
                m["checkpoint"], lambda: build_model(m["name"], bundle.num_classes, bundle.input_shape, **m["kwargs"]),
                trusted=self.trusted, allow_modules=model_modules(self.cfg))
            check_output_width(model, bundle.num_classes, bundle.input_shape)
            model.to(self.device)
        else:
            torch.manual_seed(self.cfg["seed"])
            model = build_model(m["name"], bundle.num_classes, bundle.input_shape, **m["kwargs"]).to(self.device)
            if not (self.dir / "init.pt").exists():  # w_0 of the magnitude-increase score (the paper's rewind point)
                self._save_model(model, self.dir / "init.pt")
            self._train_dense(model, bundle, important, dl)
        self._save_model(model.eval(), path)
        self._unlink(self.dir / DENSE_TRAINING)
        return model

    def _train_dense(self, model: nn.Module, bundle: DataBundle, important: list[int], dl: dict[str, Any]) -> None:
        """Warm-up, then training, checkpointed at every epoch boundary (``dense_training.pt``) and resumed from it
        exactly (weights, optimiser, schedule, RNG and shuffling state are in the checkpoint)."""
        t = self.cfg["training"]
        loss = make_loss(self.cfg, bundle, important)
        path = self.dir / DENSE_TRAINING
        saved = self._load(path, "dense training checkpoint") if self._exists(path) else None
        if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("phase"), int)
                                      and isinstance(saved.get("train"), dict)):
            raise CheckpointError(f"The dense training checkpoint {str(path)!r} was not written by this job; delete it "
                                  "to train the dense model from the start.")
        phases = [("dense warm-up", min(t["warmup_epochs"], t["epochs"]), True)] if t["warmup_epochs"] else []
        phases.append(("dense training", t["epochs"] - t["warmup_epochs"], False))
        for i, (desc, epochs, warmup) in enumerate(phases):
            # Killed before a phase's first epoch ended, the checkpoint of the phase before replays its end: exact too.
            if epochs <= 0 or (saved is not None and saved["phase"] > i):
                continue
            loss.warmup = warmup
            # The warm-up is a fixed number of epochs; the training proper stops when validation stops improving.
            stopper = EarlyStopping(dl["val"], t["patience"]) if t["patience"] is not None and not warmup else None
            train(model, dl["train"], loss, epochs=epochs, lr=t["lr"], optimizer=t["optimizer"], progress=self.progress,
                  schedule="constant" if warmup else t["schedule"], sync_batchnorm=t["sync_batchnorm"],
                  desc=desc, resume=saved["train"] if saved is not None else None, early_stopping=stopper,
                  checkpoint=lambda st, i=i: self._save({"phase": i, "train": st}, path))
            saved = None
        loss.warmup = False

    def finetuner(self, dense: nn.Module, bundle: DataBundle, important: list[int], dl: dict[str, Any],
                  attempt_of: Callable[[], int]) -> Callable[[nn.Module], None]:
        """The fine-tuning after every pruning step: the training loss (with distillation from ``dense`` when set),
        ``pruning.finetune_epochs`` at ``pruning.lr`` under ``pruning.finetune_schedule``, early stopping on the
        validation (selection) split, then (``pruning.bn_batches``) BatchNorm statistics re-estimated on training
        batches. Seeded by ``attempt_of()``, so a resumed run repeats exactly what an uninterrupted one does."""
        p = self.cfg["pruning"]
        loss = make_loss(self.cfg, bundle, important)
        seed = self.cfg["seed"]
        distillation = Distillation(dense, p["distill"], p["distill_temperature"]) if p["distill"] else None

        def finetune(m: nn.Module) -> None:
            k = attempt_of()
            torch.manual_seed(seed * 100_003 + k)
            dl["train"].generator.manual_seed(seed * 100_003 + k)
            stopper = EarlyStopping(dl["val"], p["finetune_patience"]) if p["finetune_patience"] is not None else None
            train(m, dl["train"], loss, epochs=p["finetune_epochs"], lr=p["lr"], early_stopping=stopper,
                  optimizer=self.cfg["training"]["optimizer"], progress=self.progress, desc=f"fine-tuning (attempt {k})",
                  sync_batchnorm=self.cfg["training"]["sync_batchnorm"], distillation=distillation,
                  schedule=p["finetune_schedule"])
            if p["bn_batches"]:
                recalibrate_batchnorm(m, dl["train"], p["bn_batches"])

        return finetune

    def allocate(self, dense: nn.Module, dense_val: Evaluation, bundle: DataBundle, important: list[int],
                 dl: dict[str, Any]) -> dict[str, Any] | None:
        """``pruning.allocation: search``: the per-layer widths searched on the dense model for the MACs target, judged
        on the selection split (never the certification split); every candidate is checkpointed
        (``search.json``), so a resumed run continues the search. Returns ``{"units": {name: kept fraction}, ...}``
        (``allocation.json``), or None for the uniform and global allocations."""
        p = self.cfg["pruning"]
        if p["allocation"] != "search":
            return None
        done, partial = self.dir / ALLOCATION, self.dir / SEARCH
        if self._exists(done):
            return json.loads(done.read_text())
        if p["search_objective"] == "important":
            objective = important_class_objective(dl["val"], important, {c: fpr_of(dense_val, c) for c in important})
        elif p["search_objective"] == "important_auc":
            objective = important_class_auc_objective(dl["val"], important)
        else:
            objective = accuracy_objective(dl["val"])
        example = torch.zeros(2, *bundle.input_shape, device=self.device)
        dl["train"].generator.manual_seed(self.cfg["seed"] * 100_003)  # the adaptive-BN batches: seeded, resumable
        search = width_search(p["backend"], dense, example, p["target_macs_reduction"], objective, dl["train"],
                              p["search_batches"], round_to=p["round_to"], candidates=p["search_candidates"],
                              seed=self.cfg["seed"], progress=self.progress)
        if self._exists(partial):
            search.load_state_dict(json.loads(partial.read_text()))
        result = search.run(on_candidate=lambda c, s: self._write_text(partial, json.dumps(s.state_dict())))
        allocation = {"units": result.best.allocation, "score": result.best.score, "reduction": result.best.reduction,
                      "objective": p["search_objective"], "candidates": len(result.candidates),
                      "seconds": round(result.seconds, 1)}
        self._write_text(done, json.dumps(allocation, indent=1))
        self._unlink(partial)
        return allocation

    def _backend(self, model: nn.Module, dense: nn.Module, bundle: DataBundle, important: list[int],
                 dl: dict[str, Any], attempt_of, allocation: dict[str, Any] | None = None):
        p = self.cfg["pruning"]
        finetune = self.finetuner(dense, bundle, important, dl, attempt_of)
        example = torch.zeros(2, *bundle.input_shape, device=self.device)
        # The stop target: sparsity (unstructured), fewer MACs, or measured speed against the dense model.
        probe, key, target = None, "macs_reduction", p["target_macs_reduction"]
        if p["granularity"] == "unstructured":
            key, target = "sparsity", p["target_sparsity"]
        elif p["target_latency_reduction"] is not None:
            probe = LatencyProbe(dense, bundle.input_shape, batch_size=p["latency_batch_size"],
                                 runtime=p["latency_runtime"])
            key, target = "latency_reduction", p["target_latency_reduction"]
        backend = create_backend(
            "unstructured" if p["granularity"] == "unstructured" else p["backend"], model, score=p["score"],
            score_options=score_config(p), important_classes=important, num_classes=bundle.num_classes,
            val_loader=dl["val"], calib_loader=dl["calib"], finetune=finetune, example_inputs=example,
            calib_batches=p["calib_batches"], round_to=p["round_to"], latency_probe=probe,
            rewind_model=self._initial_model, cert_loader=dl.get("cert"),
            allocation=allocation["units"] if allocation else None, global_pruning=p["allocation"] == "global")
        return backend, key, target

    def _initial_model(self) -> nn.Module:
        path = self.dir / "init.pt"
        if not self._exists(path):
            raise ClassAwareError(
                f"pruning.score={self.cfg['pruning']['score']} needs the model's initial weights, which exist only "
                "when the job trains the dense model itself (model.checkpoint is set). Use pruning.score=fisher."
            )
        return self._load_model(path)

    def _checkpoint(self, run: PruningRun, stage: str, extra: dict[str, Any] | None = None) -> None:
        self._save({"stage": stage, "model": run.model, "controller": run.loop.state_dict(),
                    "backend": run.backend.state_dict(), **(extra or {})}, self.dir / STATE)

    # ----------------------------------------------------------------- the whole job
    def run(self) -> dict[str, Any]:
        """Data -> dense model -> dense metrics -> pruning -> calibration -> export -> report; every stage's result is
        on disk before the next begins, so ``--resume`` continues from the last one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            write_config(self.dir, self.cfg)
        t0 = time.time()
        bundle, important = load_data(self.cfg)
        dl = loaders(bundle, self.cfg)
        self.check_certifiable(important, dl)
        dense = self.dense_model(bundle, important, dl)
        dense_metrics = self.dense_metrics(dense, bundle, important, dl)
        dense_val = Evaluation.from_dict(dense_metrics["validation"])
        allocation = self.allocate(dense, dense_val, bundle, important, dl)
        run = self.prune(dense, dense_val, bundle, important, dl, allocation)
        calibration = self.calibrate(run, dense_val, important, dl)
        exports = self.export(run.model, bundle)
        report = self.report(run, dense, dense_metrics, dense_val, bundle, important, dl, calibration, exports)
        report["wall_time_s"] = round(time.time() - t0, 1)
        report["allocation"] = {"method": self.cfg["pruning"]["allocation"], **(allocation or {})}
        if allocation:
            report["allocation"]["search_share"] = round(allocation["seconds"] / max(report["wall_time_s"], 1e-9), 3)
        report["processes"] = distributed.world_size()
        report["device"] = str(self.device)
        from .report import write_report

        if self.main:
            write_report(report, self.dir)
        self._checkpoint(run, "done", {"calibration": calibration})
        return report

    def check_certifiable(self, important: list[int], dl: dict[str, Any]) -> None:
        """A stated budget (``constraint.max_fn_rate``) that the splits' positives cannot certify is refused before
        any work, naming the positives it needs. (A budget derived from the dense model is checked as soon as the
        dense model is measured, before pruning.)"""
        constraint = make_constraint(self.cfg, important)
        if isinstance(constraint, FNGuarantee) and constraint.max_fn_rate is not None:
            sel, cert = labels_of(dl["val"].dataset), labels_of(dl["cert"].dataset)
            # The budget does not depend on the dense model's FN here: any count checks its feasibility.
            constraint.budgets({c: 0 for c in important}, {c: int((sel == c).sum()) for c in important},
                               {c: int((cert == c).sum()) for c in important})

    def dense_metrics(self, dense: nn.Module, bundle: DataBundle, important: list[int], dl: dict[str, Any]) -> dict[str, Any]:
        """Test metrics (FN at argmax and at the dense FPR, AUC, AP, cost) and validation metrics of the dense model."""
        path = self.dir / "dense_metrics.json"
        if self._exists(path):
            return json.loads(path.read_text())
        val_pred, test_pred = predict(dense, dl["val"]), predict(dense, dl["test"])
        val = evaluate_predictions(*val_pred, important, bundle.num_classes)
        metrics = {
            "test": {**summarise(dense, evaluate_predictions(*test_pred, important, bundle.num_classes),
                                 torch.zeros(2, *bundle.input_shape)),
                     "at_dense_fpr": operating_points(val_pred, test_pred, important, val)},
            "validation": val.to_dict(),
        }
        self._write_text(path, json.dumps(metrics, indent=1))
        return metrics

    def prune(self, dense: nn.Module, dense_val: Evaluation, bundle: DataBundle, important: list[int],
              dl: dict[str, Any], allocation: dict[str, Any] | None = None) -> PruningRun:
        """FN-constrained pruning, checkpointed after every attempt and resumed from the last one."""
        cfg, p = self.cfg, self.cfg["pruning"]
        state = self._run_state()
        model = state["model"].to(self.device) if state is not None else self._load_model(self.dir / "dense.pt")
        run = PruningRun(model, make_constraint(cfg, important),
                         stage=state["stage"] if state is not None else "pruning",
                         calibration=state.get("calibration") if state is not None else None)
        run.backend, run.key, run.target = self._backend(model, dense, bundle, important, dl,
                                                         lambda: len(run.loop.history) + 1, allocation)
        if state is not None and state.get("backend"):
            run.backend.load_state_dict(state["backend"])  # the true dense reference, NNI's masks, the rewind point

        def on_record(rec: StepRecord, loop: FNConstrainedPruning) -> None:
            if rec.decision != "rollback":  # an interrupted attempt is redone on resume, not recorded
                self._checkpoint(run, "pruning")

        run.loop = FNConstrainedPruning(run.backend, run.constraint, target=run.target, target_key=run.key,
                                        step=p["step"], max_halvings=p["max_halvings"], max_steps=p["max_steps"],
                                        on_record=on_record)
        if state is not None and state.get("controller"):
            run.loop.load_state_dict(state["controller"])
        if run.stage == "pruning":
            run.loop.run(dense=dense_val)
            run.backend.finalize()  # NNI: ModelSpeedup removes the masked channels; unstructured: masks baked in
            run.stage = "pruned"
            self._checkpoint(run, "pruned")
        else:
            run.loop.prepare(dense=dense_val)  # the budgets the report states
        return run

    def calibrate(self, run: PruningRun, dense_val: Evaluation, important: list[int],
                  dl: dict[str, Any]) -> dict[str, Any] | None:
        """Decision calibration on validation, before export so that it survives in every file. Under the certified
        rule it folds the shift the delivered step was certified with (none when no step was: the dense model is
        returned as it was)."""
        if self.cfg["calibration"] and run.stage == "pruned":
            if isinstance(run.constraint, FNGuarantee):
                last = next((r for r in reversed(run.loop.history) if r.decision == "accept"), None)
                cal = None if last is None else calibrate(
                    run.model, dl["val"], important, shifts={c: last.shifts.get(c, 0.0) for c in important})
            else:
                cal = calibrate(run.model, dl["val"], important, target_fn={k: dense_val.fn[k] for k in important})
            run.calibration, run.stage = (cal.to_dict() if cal is not None else None), "calibrated"
            self._checkpoint(run, "calibrated", {"calibration": run.calibration})
        return run.calibration

    def export(self, model: nn.Module, bundle: DataBundle) -> dict[str, Any]:
        """``pruned.pt`` and (``export.onnx``) ``pruned.onnx``, checked against onnxruntime (rank 0, from the CPU)."""
        exports: dict[str, Any] = {"pytorch": "pruned.pt"}
        if not self.main:
            return exports
        save_model(model.eval(), self.dir / "pruned.pt")
        if self.cfg["export"]["onnx"]:
            example = torch.randn(4, *bundle.input_shape, generator=torch.Generator().manual_seed(0))
            exports.update(onnx="pruned.onnx", onnx_max_abs_diff=export_onnx(model, example, self.dir / "pruned.onnx"))
        return exports

    def report(self, run: PruningRun, dense: nn.Module, dense_metrics: dict[str, Any], dense_val: Evaluation,
               bundle: DataBundle, important: list[int], dl: dict[str, Any], calibration: dict[str, Any] | None,
               exports: dict[str, Any]) -> dict[str, Any]:
        """What report.json holds: dense against pruned on test, the rule and its history, the speed-up."""
        model = run.model
        val_pred, test_pred = predict(model, dl["val"]), predict(model, dl["test"])
        pruned_val = evaluate_predictions(*val_pred, important, bundle.num_classes)
        pruned_test = evaluate_predictions(*test_pred, important, bundle.num_classes)
        macs = int(run.backend.measure()["macs"]) if self.cfg["pruning"]["granularity"] == "unstructured" else None
        return {
            "dataset": bundle.name,
            "class_names": bundle.class_names,
            "dense": {**dense_metrics["test"], "validation": dense_metrics["validation"]},
            "pruned": {**summarise(model, pruned_test, torch.zeros(2, *bundle.input_shape), macs),
                       "validation": pruned_val.to_dict(),
                       "at_dense_fpr": operating_points(val_pred, test_pred, important, dense_val)},
            "constraint": self.constraint_report(run, dense_val, pruned_val, model, bundle, dl),
            "target": {"key": run.key, "value": run.target},
            "history": [r.to_dict() for r in run.loop.history],
            "stop_reason": run.loop.stop_reason_,
            "calibration": calibration,
            "exports": exports,
            # measured on this machine's CPU by rank 0, dense and pruned interleaved (see classaware_plugin.speed)
            "speed": speedup(cpu_copy(dense), cpu_copy(model), bundle.input_shape, batch_size=64) if self.main else None,
        }

    def constraint_report(self, run: PruningRun, dense_val: Evaluation, pruned_val: Evaluation, model: nn.Module,
                          bundle: DataBundle, dl: dict[str, Any]) -> dict[str, Any]:
        """report.json's ``constraint``: the rule, its budget and whether the delivered model meets it. Certified
        rule: ``guarantee`` = per class the budget, the level, the upper bound and the positives of the delivered model
        on the certification split (empty when no step was certified), and the sentence that states it."""
        c, important = self.cfg["constraint"], run.constraint.important_classes
        out: dict[str, Any] = {"rule": c["rule"], "important_classes": important,
                               "max_accuracy_drop": c["max_accuracy_drop"],
                               "operating_point": run.constraint.operating_point}
        if isinstance(run.constraint, FNConstraint):
            return {**out, "abs_tol": c["abs_tol"], "rel_tol": c["rel_tol"],
                    "budget": {str(k): v for k, v in run.constraint.budget(dense_val.fn).items()},
                    "satisfied": not run.constraint.violations(dense_val, pruned_val)}
        budgets = run.loop.budgets_
        guarantee: dict[str, Any] = {}
        final: dict[int, Any] = {}
        if run.loop.certificate_:
            # The delivered model (shift folded in, NNI sped up) tested again: the same model, so the same counts.
            final = run.constraint.certify(budgets, *predict(model, dl["cert"]))
            if {k: v.fn for k, v in final.items()} != {k: v.fn for k, v in run.loop.certificate_.items()}:
                log.warning("the delivered model's certification counts %s differ from its step's %s (numerics of the "
                            "export path); the report states the delivered model's", final, run.loop.certificate_)
            guarantee = {str(k): {**v.to_dict(), "derived": budgets[k].derived} for k, v in final.items()}
        return {**out, "delta": c["delta"], "certification_fraction": c["certification_fraction"],
                "budgets": {str(k): b.to_dict() for k, b in budgets.items()},
                # the plot's and table's line: the most selection-split misses a step may show to be sent to the test
                "budget": {str(k): b.screen_limit for k, b in budgets.items()},
                "guarantee": guarantee,
                "sentence": guarantee_sentence(final, bundle.class_names, c["delta"]) if final else None,
                "satisfied": bool(guarantee) and all(g["certified"] for g in guarantee.values())}


@dataclass
class PruningRun:
    """The pruning stage's objects, shared by the stages after it."""

    model: nn.Module
    constraint: FNConstraint | FNGuarantee
    stage: str = "pruning"
    calibration: dict[str, Any] | None = None
    backend: Any = None
    loop: Any = None
    key: str = "macs_reduction"
    target: float = 2.0


MARKER = ".classaware-run"
"""Written first into every run directory: ``--force`` deletes only directories that carry it."""
RUN_FILES = (MARKER, "config.yaml", STATE, DENSE_TRAINING, ALLOCATION, SEARCH, "dense.pt", "init.pt", "dense_metrics.json", "pruned.pt", "pruned.onnx", "pruned.onnx.data",
             "report.json", "report.md", "fn_vs_compression.png")
"""Everything a run writes (``--force`` removes these and nothing else)."""


def _contents(path: Path) -> list[Path]:
    """What a directory holds besides the run lock (which the process starting a run creates first)."""
    return [p for p in path.iterdir() if p.name != LOCK] if path.is_dir() else []


def check_run_dir(path: Path, force: bool) -> None:
    """Refuse, writing nothing, a run directory a new run may not use: a file, a non-empty directory without
    ``--force``, or (with it) a non-empty directory that no run created."""
    if path.exists() and not path.is_dir():
        raise ClassAwareError(f"The run directory {str(path)!r} is a file; choose a directory for --out.")
    if _contents(path):
        if not force:
            raise ClassAwareError(
                f"The run directory {str(path)!r} is not empty. Resume it with 'classaware-prune run --resume {path}', "
                "choose another output_dir, or pass --force to start over."
            )
        if not (path / MARKER).exists():
            raise ClassAwareError(
                f"--force refused: {str(path)!r} is not empty and is not a classaware-prune run directory (it has no "
                f"{MARKER} file), so nothing in it is deleted. Choose an empty or new directory for --out."
            )


def prepare_run_dir(path: Path, force: bool) -> Path:
    """Create the run directory, or with ``force`` clear a previous run's files from it.

    A non-empty directory is reused only when it is a run directory (it has the marker file); ``--force`` then
    deletes the files a run writes and nothing else, so ``--out ~/data --force`` cannot erase a user's data.
    """
    check_run_dir(path, force)
    if _contents(path):
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
            for tmp in leftover_temp_files(path / name):  # of an atomic write the run was killed in
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        left = sorted(p.name for p in _contents(path))
        if left:
            log.warning("--force kept files that no run writes in %s: %s", path, ", ".join(left[:10]))
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / MARKER, "classaware-prune run directory; --force may clear the files a run writes here\n")
    except OSError as e:
        raise ClassAwareError(f"Cannot write the run directory {str(path)!r}: {e.strerror}. Choose a writable --out.") from None
    return path
