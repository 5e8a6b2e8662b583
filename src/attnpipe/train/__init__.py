"""Training: Ray Train launch, the per-worker loop, losses, schedules, checkpoints."""
