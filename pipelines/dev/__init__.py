"""Dev-only helpers: the GCS emulator, sample images, random-weight models and the local run.

The product (worker, components, the pipeline) never imports this package; dev entry points
(`python -m pipelines run --local`, `make-model`), benchmarks, the notebook and tests do.
"""
