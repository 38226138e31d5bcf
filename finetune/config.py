"""Config section of the fine-tuning stage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ember.config import Section


class FinetuneConfig(Section):
    """Fine-tune a pretrained checkpoint on a downstream task."""

    init_from: Path = Field(description="pretraining checkpoint or HF model directory to start from")
    task: str = Field(description="downstream task name or dataset path")
    mode: Literal["full", "head", "lora"] = Field("full", description="which weights train: all, only the task head, or low-rank adapters")
