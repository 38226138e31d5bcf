"""Config sections of the data stage: the training-data mixture a run reads."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ember.config import Section


class DatasetEntry(Section):
    """One prepared dataset in a training mixture."""

    path: Path | None = Field(None, description="prepared dataset directory (holds manifest.json); default: the output_dir of `prepare`")
    prepare: str | None = Field(None, description="data-prepare preset or YAML (configs/data/) that builds `path` when it holds no dataset yet")
    weight: float = Field(1.0, gt=0, description="sampling weight in the mixture (normalised over all datasets)")

    @model_validator(mode="after")
    def _needs_a_source(self):
        if self.path is None and self.prepare is None:
            raise ValueError("give `path` (a prepared dataset) or `prepare` (a data-prepare config)")
        return self


class DataConfig(Section):
    """The training data: a weighted mixture of prepared token-shard datasets."""

    datasets: list[DatasetEntry] = Field(min_length=1, description="prepared datasets and their mixture weights")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (0: read in the training process)")
