"""The training engine: device set-up, optimiser and schedule, checkpoints, run directory."""
