"""Pipeline definitions, the local runner and the ``python -m pipelines`` CLI."""
