"""``classaware-prune``: run the main job, print the default configuration, evaluate a saved model.

    classaware-prune run [--config FILE] [--set key=value ...] [--out DIR] [--force] [--quiet] [--trust-checkpoint]
    classaware-prune run --resume DIR
    classaware-prune run --nproc N ...                      # N processes on this machine (torch.distributed)
    torchrun --nproc-per-node N -m classaware_plugin.cli run ...  # the same, with torchrun's own flags
    classaware-prune config --default
    classaware-prune evaluate MODEL --data digits --important 3 [--split test] [--trust-checkpoint]

Errors print one line ``error: ...`` and no traceback (``--debug`` shows it): exit status 2 for a mistake of the
user's (arguments, configuration, files, data; found before any work where it can be), 1 for anything else. A run
stopped by an error keeps what it completed and can be resumed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

log = logging.getLogger("classaware_plugin")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Libraries we call are not allowed to talk over our output.
    for noisy in ("nni", "torch_pruning", "matplotlib", "PIL", "onnxscript", "onnx_ir", "torch.onnx", "torch.export",
                  "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Converting a tensor to a Python.*")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="classaware-prune", description="Class-dependent pruning with an FN budget.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust-checkpoint", action="store_true",
                       help="unpickle model files in full (they can run code: only for files you trust); without it "
                            "only PyTorch/torchvision/classaware_plugin module classes are loaded")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", parents=[trust], help="prune a model end to end and write a report")
    r.add_argument("--config", help="YAML configuration (see 'classaware-prune config --default')")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. pruning.step=0.1")
    r.add_argument("--out", help="run directory (overrides output_dir)")
    r.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its directory")
    r.add_argument("--force", action="store_true", help="start over in a non-empty run directory")
    r.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    r.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="run in N processes on this machine through torch.distributed (data split between them; "
                        "on CUDA one GPU each); under torchrun leave it out")
    c = sub.add_parser("config", help="print the commented default configuration")
    c.add_argument("--default", action="store_true", required=True)
    e = sub.add_parser("evaluate", parents=[trust], help="per-class table of a saved model")
    e.add_argument("model", help="a model saved by classaware-prune (pruned.pt, dense.pt)")
    e.add_argument("--data", default="digits", help="data set name (digits, breast_cancer, fashion_mnist, image_folder)")
    e.add_argument("--important", nargs="+",
                   help="important classes (indices or names; default: those of --config, else the default 3)")
    e.add_argument("--config", help="take the data settings from this run configuration (e.g. RUN/config.yaml)")
    e.add_argument("--split", default="test", choices=["val", "test"])
    return p


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (a number of processes). Got {text!r}.")
    return int(text)


def cmd_run(args: argparse.Namespace) -> int:
    from . import launch

    if launch.under_torchrun() and args.nproc is not None:
        from ..core.validation import ClassAwareError

        raise ClassAwareError("--nproc starts its own processes; under torchrun leave it out (torchrun's "
                              "--nproc-per-node sets the number).")
    try:
        return _run(args)
    finally:
        launch.leave()


def _run(args: argparse.Namespace) -> int:
    from ..core import distributed
    from ..core.progress import set_quiet
    from . import launch
    from .config import load_config
    from .job import check_run_dir, prepare_run_dir
    from .lock import RunLock

    set_quiet(args.quiet)
    from ..core.validation import ClassAwareError
    from .job import MARKER

    parallel = args.nproc is not None and args.nproc > 1

    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.set:
            raise ClassAwareError(
                f"--resume continues {run_dir} with the configuration saved in it (config.yaml); --config and --set "
                "cannot change a run midway. Start a new run with them instead."
            )
        if not (run_dir / "config.yaml").is_file():
            if (run_dir / MARKER).is_file():
                raise ClassAwareError(
                    f"{run_dir} was stopped before it saved its configuration, so there is nothing to resume; start it "
                    f"again with: classaware-prune run --out {run_dir} --force (and the --config/--set you used)."
                )
            raise ClassAwareError(f"{run_dir} is not a run directory (no config.yaml).")
        cfg = load_config(run_dir / "config.yaml", _rule_of_an_older_run(run_dir / "config.yaml"))
    else:
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.out or cfg["output_dir"])
    if parallel:
        launch.check_splittable(cfg, args.nproc)  # before any work
    if launch.under_torchrun():
        launch.join(cfg)
    lock = RunLock(run_dir)
    failed = None
    # Rank 0 takes the directory's lock and prepares it; the others take its outcome. The processes that --nproc
    # starts write under their launcher's lock.
    if distributed.is_main() and not os.environ.get(launch.LAUNCHED):
        try:
            if not args.resume:
                check_run_dir(run_dir, args.force)  # refused before anything is written into it
            lock.acquire()
            if not args.resume:
                prepare_run_dir(run_dir, args.force)
        except ClassAwareError as e:
            lock.release()
            failed = str(e)
    failed = distributed.broadcast_object(failed)
    if failed:
        raise ClassAwareError(failed)
    if args.resume and not os.environ.get(launch.LAUNCHED):
        log.info("resuming %s", run_dir)
    if not args.resume:
        cfg["output_dir"] = str(run_dir)
    try:
        return _execute(args, cfg, run_dir, parallel)
    finally:
        lock.release()


def _execute(args: argparse.Namespace, cfg: dict, run_dir: Path, parallel: bool) -> int:
    """The run itself, in a prepared and locked run directory; prints the summary."""
    from ..core import distributed
    from ..core.validation import ClassAwareError
    from . import launch
    from .job import Job

    resume = (f"classaware-prune run --resume {run_dir}" + (" --trust-checkpoint" if args.trust_checkpoint else "")
              + (f" --nproc {args.nproc}" if parallel else "")
              + (f" --nproc {os.environ['WORLD_SIZE']}" if os.environ.get(launch.LAUNCHED) else ""))
    if parallel:
        from .job import write_config

        write_config(run_dir, cfg)  # the processes resume it
        log.info("starting %d processes for %s", args.nproc, run_dir)
        flags = [f for f, on in (("--quiet", args.quiet), ("--trust-checkpoint", args.trust_checkpoint)) if on]
        return launch.launch(args.nproc, run_dir, flags, ["--debug"] if args.debug else [])
    try:
        report = Job(cfg, run_dir, progress=not args.quiet, trusted=args.trust_checkpoint).run()
    except KeyboardInterrupt:
        print(f"\nInterrupted. Nothing completed is lost; continue with:\n  {resume}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; the traceback with --debug
        if args.debug:
            raise
        who = f"[rank {distributed.rank()}] " if distributed.is_distributed() else ""
        print(f"{who}error: {_one_line(e)}\nThe run stopped and keeps what it completed. After fixing the data or "
              f"files, continue with: {resume} (a configuration mistake needs a new run: --force).", file=sys.stderr)
        return 2 if isinstance(e, ClassAwareError) else 1
    if not distributed.is_main():
        return 0
    d, p = report["dense"], report["pruned"]
    imp = report["constraint"]["important_classes"]
    names = report["class_names"]
    print(f"Dense : {d['params']:,} params, {d['macs']:,} MACs, accuracy {d['accuracy']:.3f}, "
          + ", ".join(f"FN[{names[c]}] {d['fn'][str(c)]}" for c in imp) + " (test)")
    print(f"Pruned: {p['params']:,} params, {p['macs']:,} MACs, accuracy {p['accuracy']:.3f}, "
          + ", ".join(f"FN[{names[c]}] {p['fn'][str(c)]}" for c in imp) + " (test)")
    if report["constraint"]["rule"] == "certified":
        print(report["constraint"]["sentence"] or "No pruned model could be certified: the dense model is returned.")
    print(f"Stop reason: {report['stop_reason']}; FN constraint "
          f"{('certified' if report['constraint']['rule'] == 'certified' else 'satisfied on validation') if report['constraint']['satisfied'] else 'NOT met'}.")
    print(f"Report: {run_dir / 'report.md'}  (also report.json, fn_vs_compression.png)")
    return 0


def _rule_of_an_older_run(path: Path) -> list[str]:
    """A run started before the certified rule existed saved no ``constraint.rule``: it resumes with the count rule it
    was started with (its splits and decisions), not with today's default."""
    import yaml

    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []  # load_config reports what is wrong with the file
    section = saved.get("constraint") if isinstance(saved, dict) else None
    return ["constraint.rule=count"] if isinstance(section, dict) and "rule" not in section else []


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..core.metrics import evaluate
    from ..export import load_model
    from .config import load_config
    from .job import load_data

    overrides = [f"important_classes=[{','.join(args.important)}]"] if args.important else []
    if args.config:
        cfg = load_config(args.config, overrides)  # without --important: the run's own important classes
    else:
        cfg = load_config(None, [*overrides, f"data.name={args.data}"])
    model = load_model(args.model, trusted=args.trust_checkpoint)
    bundle, important = load_data(cfg)
    dl = dict(zip(("train", "val", "test"), bundle.loaders(cfg["data"]["batch_size"], seed=cfg["seed"])))
    ev = evaluate(model, dl[args.split], important, bundle.num_classes)
    print(f"{args.model} on {bundle.name} ({args.split}, {ev.num_samples} samples): accuracy {ev.accuracy:.4f}")
    print(f"{'class':<16}{'cases':>7}{'FN':>6}{'FP':>6}{'recall':>9}{'AUC':>8}")
    for c, name in enumerate(bundle.class_names):
        auc = f"{ev.auc[c]:.3f}" if c in ev.auc else ""
        star = "*" if c in important else " "
        print(f"{star}{name:<15}{ev.support[c]:>7}{ev.fn[c]:>6}{ev.fp[c]:>6}{ev.recall[c]:>9.3f}{auc:>8}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    from ..core.validation import ClassAwareError

    try:
        if args.command == "config":
            from .config import default_text

            print(default_text(), end="")
            return 0
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_run(args)
    except ClassAwareError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - not a mistake we recognise: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"error: {_one_line(e)} (unexpected: rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    from ..core.validation import ClassAwareError

    text = " ".join(str(e).split())
    return text if isinstance(e, ClassAwareError) else f"{type(e).__name__}: {text}"


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
