"""The fine-tuning tests start from tiny pretraining runs made with the pretraining tests' helpers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pretrain"))
