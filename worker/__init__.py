"""The distributed batch-inference worker: ``python -m worker`` or ``torchrun -m worker``."""

import os

# Streams share the GPU's hardware work queues, 8 by default, and kernels in one queue run in
# order: the model's kernels then delay the JPEG decoder's (on its many internal streams), which
# ran much slower beside the model with 8 queues than with 32 (benchmarks/NOTES.md).
# The driver reads this once, when the CUDA context is made, so it is set when the package is
# imported; a value the user set wins.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
