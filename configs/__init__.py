"""YAML presets shipped with ember: models, data recipes, pretrain recipes, DeepSpeed templates."""
