"""Training: config, optimizer and schedule, checkpoints with exact resume, the mixture step, distribution."""
