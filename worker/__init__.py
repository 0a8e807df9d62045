"""The distributed batch-inference worker: ``python -m worker`` or ``torchrun -m worker``."""
