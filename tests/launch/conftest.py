"""The launch tests' helpers (launch_runs.py here, pretrain_runs.py of the pretrain tests) on the import path."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "pretrain"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
