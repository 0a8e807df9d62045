"""The launch step: run the worker locally under torchrun or as a Kubernetes job on GKE."""
