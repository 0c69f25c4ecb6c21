"""Training: model building, the one train loop, DeepSpeed config, LR schedules, checkpoints, export."""
