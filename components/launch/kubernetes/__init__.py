"""The kubernetes backend: the worker as a PyTorchJob, TrainJob or JobSet, queued by Kueue + DWS."""
