"""The first step's KFP component, a thin wrapper over :mod:`components.check.checks`."""

from kfp import dsl

from components.images import TASK_IMAGE


@dsl.component(base_image=TASK_IMAGE, install_kfp_package=False)
def check_parameters(
    source: str,
    images_uri: str,
    results_root: str,
    results_prefix: str,
    model: str,
    backend: str,
    image: str,
    batch_size: int,
    shard_size: int,
    incremental: bool,
    upload_layout: str,
    packed_shard_mb: int,
    packed_shard_images: int,
    task: str,
    top_k: int,
    labels: list,
    labels_file: str,
    prompt: str,
    normalize: bool,
    embedding_dtype: str,
):
    """Checks a run's parameters in seconds, before anything is uploaded or any GPU asked for.

    Fails with one line naming the parameter at fault.

    Args:
        source: Where the images come from (empty: they are at images_uri).
        images_uri: The images' prefix.
        results_root: Where the run's results go.
        results_prefix: The run's exact results prefix, if set.
        model: The model: it must load and its preprocessing be reproducible.
        backend: kubernetes (then the images, results and model must be reachable from the
            job's pods) or local.
        image: The image of the job's pods: not a placeholder (kubernetes backend).
        batch_size: Images per forward pass.
        shard_size: Images per shard.
        incremental: Whether an input with no images is allowed (nothing new since the last run).
        upload_layout: How the upload stores the images (loose or packed).
        packed_shard_mb: The packed layout's most MB per shard.
        packed_shard_images: The packed layout's most images per shard.
        task: classification, embedding, zero-shot, or package.module:ClassName.
        top_k: Labels per image of the label tasks.
        labels: Zero-shot candidate labels.
        labels_file: Zero-shot labels file (one per line), instead of labels.
        prompt: Zero-shot text template, {} standing for the label.
        normalize: Unit-norm embeddings.
        embedding_dtype: float32 or float16 embeddings.
    """
    from components.check.checks import check_input, check_run

    check_run(
        images_uri=images_uri,
        results_root=results_root,
        results_prefix=results_prefix,
        model=model,
        backend=backend,
        image=image,
        batch_size=batch_size,
        shard_size=shard_size,
        upload_layout=upload_layout,
        packed_shard_mb=packed_shard_mb,
        packed_shard_images=packed_shard_images,
        task=task,
        top_k=top_k,
        labels=labels,
        labels_file=labels_file,
        prompt=prompt,
        normalize=normalize,
        embedding_dtype=embedding_dtype,
    )
    if not incremental:
        check_input(source, images_uri)
