"""``python -m classaware_plugin.cli`` (what ``torchrun -m classaware_plugin.cli run ...`` starts in each process)."""
import os
import sys

from .main import main

os.environ.setdefault("MPLBACKEND", "Agg")
sys.exit(main())
