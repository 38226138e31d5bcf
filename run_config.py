"""The run config: every stage's section composed into one tree, saved with every run."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ember.config import Section, preset_dir
from ember.data.config import DataConfig
from ember.finetune.config import FinetuneConfig
from ember.launch.config import LaunchConfig
from ember.pretrain.config import ModelConfig, TrackingConfig, TrainConfig


class RunConfig(Section):
    """One pretraining run."""

    run_dir: Path = Field(Path("runs/default"), description="directory for config.yaml, logs, metrics, checkpoints and exports")
    seed: int = Field(1234, ge=0, description="seed of weights init, data order and dropout")
    data: DataConfig = Field(description="training data mixture")
    model: ModelConfig = Field(description="model shape, or a preset name from configs/models/", json_schema_extra=preset_dir("models"))
    train: TrainConfig = Field(default_factory=TrainConfig, description="training recipe")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="metrics and W&B")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="process layout")


class FinetuneRunConfig(Section):
    """One fine-tuning run: `ember finetune CONFIG --from PARENT`; the model comes from the parent."""

    run_dir: Path = Field(Path("runs/finetune"), description="directory for config.yaml, logs, metrics, checkpoints and exports")
    seed: int = Field(1234, ge=0, description="seed of the new head's init, data order and dropout")
    model: ModelConfig | None = Field(None, description="model shape (default: the parent's; needed without --from)", json_schema_extra=preset_dir("models"))
    train: TrainConfig = Field(default_factory=TrainConfig, description="training recipe")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="metrics and W&B")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="process layout")
    finetune: FinetuneConfig = Field(description="the task, the transfer mode and the parent")
