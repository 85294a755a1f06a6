"""Training: the objective, one step (eager or a CUDA graph), the epoch loop, checkpoints, faults. Uses the parts."""
