"""python -m benchmarks run [--quick] [--suite NAME ...] [--out DIR]; python -m benchmarks summarize [--out DIR]"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--quick", action="store_true", help="fewer levels, one seed (under 15 minutes on 2 cores)")
    r.add_argument("--suite", nargs="*", help="suite names (default: all of the mode)")
    r.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, quick: benchmarks/results/quick)")
    s = sub.add_parser("summarize")
    s.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("classaware_plugin", "torch_pruning", "nni"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from .harness import RESULTS, run
    from .summarize import summarize

    out = args.out or (RESULTS / "quick" if getattr(args, "quick", False) else RESULTS)
    if args.cmd == "run":
        t = time.time()
        run(args.suite, args.quick, out)
        logging.getLogger("benchmarks").info("all done in %.0f s", time.time() - t)
    summarize(out)


if __name__ == "__main__":
    main()
