"""Training: the one loop (`Trainer`, in trainer.py), its objectives, optimizers, schedules,
data and checkpoints. Import from the modules themselves; this package file stays empty so
that `lmforge --help` does not load torch."""
