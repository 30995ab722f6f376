"""Progress bars (tqdm) that scripts can silence in one place."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = os.environ.get("CLASSAWARE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar of this package."""
    global _QUIET
    _QUIET = bool(quiet)


def progress_bar(iterable: Iterable[T], desc: str, total: int | None = None, disable: bool = False, **kw: Any) -> Iterable[T]:
    """A tqdm bar with ETA on stderr; off when quiet, disabled, or stderr is not a terminal (logs stay clean)."""
    off = disable or _QUIET or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=off, leave=False, dynamic_ncols=True, **kw)
