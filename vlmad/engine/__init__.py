"""Engine layer: the Lightning/Hydra wiring (run, the one LightningModule, checkpoints, comparisons)."""
