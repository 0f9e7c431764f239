"""Training: the CLI (`python -m gligen fit | validate`), checkpoints that survive preemption, non-finite step
guards, run directories, and the Lightning callbacks (skip accounting, sample grids, grounding AP)."""
