"""python -m benchmarks run [--quick] [--suite NAME ...] [--out DIR]; python -m benchmarks latency|rescore [--suite NAME ...]
[--out DIR]; python -m benchmarks summarize [--out DIR]; python -m benchmarks scoring [--out DIR];
python -m benchmarks speed [--models NAME ...] [--out DIR]; python -m benchmarks jobtime [--backends NAME ...];
python -m benchmarks throughput [--nproc N ...] [--models NAME ...] [--device auto|cpu|cuda];
python -m benchmarks dense-loss [--suite NAME ...] [--out DIR]; python -m benchmarks noise [--data NAME ...];
python -m benchmarks guarantee [--data NAME ...] [--seeds N ...];
python -m benchmarks allocation correlation|repeatability|compare|latency [--data NAME ...] [--seeds N ...] [--levels X ...]"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a thread count (allowed: an integer >= 1)")
    return value


def main() -> None:
    from .suites import LOSS_ABLATION, SUITES

    suites = sorted(SUITES)
    methods = sorted({m for suite in SUITES.values() for m in suite.methods})
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--quick", action="store_true", help="fewer levels, one seed (under 15 minutes on 2 cores)")
    r.add_argument("--suite", nargs="*", choices=suites, metavar="SUITE", help=f"suite names (default: all of the mode): {', '.join(suites)}")
    r.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, quick: benchmarks/results/quick)")
    r.add_argument("--seeds", type=int, nargs="*", help="only these seeds of each suite (to split a suite over processes)")
    r.add_argument("--methods", nargs="*", choices=methods, metavar="METHOD", help="only these methods of each suite")
    r.add_argument("--levels", type=float, nargs="*", help="only these levels of each suite")
    r.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's); two runs with 1 thread each use 2 "
                   "cores better than one with 2 for these small models")
    rs = sub.add_parser("rescore", help="add FN at the dense FPR read on the test ROC to rows whose model is kept")
    rs.add_argument("--suite", nargs="*", choices=suites, metavar="SUITE", help="suite names (default: all)")
    rs.add_argument("--out", type=Path)
    lat = sub.add_parser("latency", help="re-measure every row's latency from its cached model, alone on the machine")
    lat.add_argument("--suite", nargs="*", choices=suites, metavar="SUITE", help="suite names (default: every suite in raw.jsonl)")
    lat.add_argument("--out", type=Path)
    s = sub.add_parser("summarize")
    s.add_argument("--out", type=Path)
    sc = sub.add_parser("scoring", help="time one scoring pass of ours vs TP GroupTaylorImportance (results/scoring.json)")
    sc.add_argument("--out", type=Path)
    sc.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    sp = sub.add_parser("speed", help="dense vs pruned latency, with and without channel rounding (results/speed.md)")
    sp.add_argument("--out", type=Path)
    sp.add_argument("--models", nargs="*", choices=["resnet18", "mobilenet_v2", "resnet8", "resnet8_w32"], metavar="MODEL")
    sp.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    jt = sub.add_parser("jobtime", help="wall time of classaware-prune run on a 10k-image ImageFolder (results/jobtime.md)")
    jt.add_argument("--out", type=Path)
    jt.add_argument("--backends", nargs="*", choices=["torch-pruning", "nni"], metavar="BACKEND")
    jt.add_argument("--nproc", type=_positive_int, default=1, help="processes of the job (classaware-prune run --nproc)")
    dl = sub.add_parser("dense-loss", help="dense models trained with cross-entropy vs the class-dependent loss, FN at "
                        "the cross-entropy model's FPR (results/dense_loss.md)")
    dl.add_argument("--suite", nargs="*", choices=sorted(LOSS_ABLATION), metavar="SUITE",
                    help=f"cross-entropy suites (default: all): {', '.join(sorted(LOSS_ABLATION))}")
    dl.add_argument("--out", type=Path)
    dl.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    nz = sub.add_parser("noise", help="spread of a step's validation accuracy and FN over fine-tuning seeds, per "
                        "fine-tuning variant (results/noise.md)")
    nz.add_argument("--data", nargs="*", choices=["digits", "fashion"], metavar="DATA")
    nz.add_argument("--out", type=Path)
    nz.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    gu = sub.add_parser("guarantee", help="validity and cost of the certified FN rule against the count rule and "
                        "class-agnostic sweeps held to the same guarantee (results/guarantee.md)")
    gu.add_argument("--data", nargs="*", choices=["fashion", "digits", "cancer", "mobilenet"], metavar="DATA")
    gu.add_argument("--seeds", type=int, nargs="*", help="seeds (default 0-9)")
    gu.add_argument("--rules", nargs="*", choices=["certified", "count", "certified_no_bn", "certified_stated",
                                                   "tp_taylor_sweep", "nni_l1_sweep"], metavar="RULE",
                    help="only these rules (default: all)")
    gu.add_argument("--out", type=Path)
    gu.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    al = sub.add_parser("allocation", help="issue 32: does a width search judged by the important class buy anything? "
                        "(results/allocation_correlation.md, results/allocation.md)")
    al.add_argument("mode", choices=["correlation", "repeatability", "compare", "latency"])
    al.add_argument("--data", nargs="*", choices=["digits", "fashion", "mobilenet"], metavar="DATA")
    al.add_argument("--seeds", type=int, nargs="*", help="compare: seeds (default 0-4)")
    al.add_argument("--levels", type=float, nargs="*", help="compare: MACs reductions (default 2 3 5)")
    al.add_argument("--candidates", type=_positive_int, default=8, help="repeatability: allocations (default 8)")
    al.add_argument("--repeats", type=_positive_int, default=4, help="repeatability: fine-tunings each (default 4)")
    al.add_argument("--finetune-scale", type=float, default=1.0,
                    help="repeatability: times the fine-tuning budget (default 1)")
    al.add_argument("--out", type=Path)
    al.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    tp_ = sub.add_parser("throughput", help="samples/s of the statistics pass and fine-tuning with 1, 2, ... processes")
    tp_.add_argument("--out", type=Path)
    tp_.add_argument("--nproc", type=_positive_int, nargs="*", default=[1, 2], help="process counts (default: 1 2)")
    tp_.add_argument("--models", nargs="*", choices=["resnet8", "resnet18"], metavar="MODEL")
    tp_.add_argument("--device", default="auto", help="auto | cpu | cuda (one GPU per process)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("classaware_plugin", "torch_pruning", "nni"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from .summarize import DenseMismatchError

    try:
        _dispatch(args)
    except DenseMismatchError as e:
        p.exit(2, f"error: {e}\n")


def _dispatch(args: argparse.Namespace) -> None:
    from .harness import RESULTS, remeasure_latency, rescore, run
    from .suites import LOSS_ABLATION
    from .summarize import summarize

    out = args.out or (RESULTS / "quick" if getattr(args, "quick", False) else RESULTS)
    if getattr(args, "threads", None):  # every command that runs models takes --threads
        import torch

        torch.set_num_threads(args.threads)
    if args.cmd == "run":
        t = time.time()
        run(args.suite, args.quick, out, seeds=args.seeds, methods=args.methods, levels=args.levels)
        logging.getLogger("benchmarks").info("all done in %.0f s", time.time() - t)
    elif args.cmd == "scoring":
        from .scoring import run as run_scoring

        run_scoring(out)
        return
    elif args.cmd == "speed":
        from .speed import MODELS, run as run_speed

        run_speed(out, tuple(args.models or MODELS))
        return
    elif args.cmd == "dense-loss":
        from .dense_loss import run as run_dense_loss

        run_dense_loss(out, tuple(args.suite or sorted(LOSS_ABLATION)))
        return
    elif args.cmd == "noise":
        from .noise import DATA, run as run_noise

        run_noise(out, tuple(args.data or DATA))
        return
    elif args.cmd == "guarantee":
        from .guarantee import DATA as G_DATA, SEEDS, run as run_guarantee

        run_guarantee(out, tuple(args.data or G_DATA), tuple(args.seeds if args.seeds is not None else SEEDS),
                      tuple(args.rules) if args.rules else None)
        return
    elif args.cmd == "allocation":
        from .allocation import DATA as A_DATA, run as run_allocation

        seeds = tuple(args.seeds if args.seeds is not None else range(5))
        run_allocation(args.mode, out, tuple(args.data or A_DATA), seeds, tuple(args.levels or (2.0, 3.0, 5.0)),
                       args.candidates, args.repeats, args.finetune_scale)
        return
    elif args.cmd == "jobtime":
        from .jobtime import BACKENDS, run as run_jobtime

        run_jobtime(out, tuple(args.backends or BACKENDS), args.nproc)
        return
    elif args.cmd == "throughput":
        from .throughput import MODELS as TP_MODELS, run as run_throughput

        run_throughput(out, tuple(args.nproc), tuple(args.models or TP_MODELS), args.device)
        return
    elif args.cmd == "rescore":
        n = rescore(args.suite, out)
        logging.getLogger("benchmarks").info("FN at the dense FPR on the test ROC added to %d rows", n)
    elif args.cmd == "latency":
        t = time.time()
        n = remeasure_latency(args.suite, out)
        logging.getLogger("benchmarks").info("latency of %d rows re-measured in %.0f s", n, time.time() - t)
    summarize(out)


if __name__ == "__main__":
    main()
