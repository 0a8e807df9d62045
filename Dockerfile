# The project's two images, two targets of this one file:
#
#   worker  the CUDA image of the job's pods:   bash -c "... exec torchrun ... -m worker ..."
#   tasks   a CPU image for the three KFP tasks (upload, launch, aggregate):
#           python3 -m kfp.dsl.executor_main ... (kfp's own command). It holds a CPU build of
#           torch, for the local backend (the worker inside the launch task), and no CUDA: a
#           fraction of the worker image's size, so the tasks start in seconds.
#
#   docker build --target worker -t REGISTRY/kfp-batch-inference:0.1.0 .
#   docker build --target tasks  -t REGISTRY/kfp-batch-inference-tasks:0.1.0 .
#
# The compiled pipelines name both (components/images.py: the tasks' base image, and the
# default of the pipeline's `image` parameter for the job's pods); give them at compile time
# with --task-image and --image (or BATCH_INFERENCE_TASK_IMAGE and BATCH_INFERENCE_WORKER_IMAGE).
#
# The worker's base brings CUDA, cuDNN, PyTorch and torchvision (nvjpeg batched decode on the GPU)
# on a Python below 3.13 (gcs-torch-dataflux needs < 3.13). The build keeps the base's torch as it
# is: its exact versions become pip constraints, so pip can never swap it for a PyPI build.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
ARG TASK_BASE_IMAGE=python:3.12-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS worker

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# 1. The base's Python must suit gcs-torch-dataflux; torchvision must sit beside torch (the
#    official pytorch/pytorch images have it; another base gets the build matching its torch,
#    torchvision 0.(minor+15).patch from PyTorch's index for the same CUDA, without deps).
# 2. Pin what the base already has (torch, torchvision, and torchaudio and triton where present)
#    as constraints for every pip run in this image, now and later.
RUN python3 -c "import sys; v = sys.version_info[:2]; assert (3, 10) <= v < (3, 13), \
        f'Python {sys.version.split()[0]}: gcs-torch-dataflux needs 3.10 to 3.12'" \
 && if ! python3 -c "import torchvision" 2>/dev/null; then \
        TV="$(python3 -c "import torch; v = torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1]) + 15}.{v[2]}')")" \
     && CU="$(python3 -c "import torch; c = torch.version.cuda; print('cu' + c.replace('.', '') if c else 'cpu')")" \
     && python3 -m pip install --no-deps "torchvision==${TV}" --index-url "https://download.pytorch.org/whl/${CU}"; \
    fi \
 && mkdir -p /etc/pip \
 && python3 -c "import importlib.metadata as m; \
        names = ('torch', 'torchvision', 'torchaudio', 'triton'); \
        found = {n: m.version(n) for n in names if any((d.metadata['Name'] or '').lower() == n for d in m.distributions())}; \
        print(''.join(f'{n}=={v}\n' for n, v in found.items()), end='')" > /etc/pip/base-constraints.txt \
 && cat /etc/pip/base-constraints.txt \
 && grep -q '^torch==' /etc/pip/base-constraints.txt && grep -q '^torchvision==' /etc/pip/base-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip/base-constraints.txt

# Triton (the worker's Pillow-exact resize kernels, and torch.compile's fused kernels) builds its
# small launcher modules with the system C compiler on first use. CUDA runtime bases had none
# (pytorch/pytorch#116696; later ones ship gcc, and then this is a no-op); without one the worker
# falls back to torch's resize and an uncompiled forward, which are slower.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kfp-batch-inference
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY components ./components
COPY pipelines ./pipelines

# The project and its dependencies (kfp, kfp-kubernetes, transformers, gcs-torch-dataflux,
# google-cloud-storage, pandas, ...), not editable, with the `vertex` extra (google-cloud-container:
# a launcher on Vertex reads the GKE cluster's endpoint and CA) and `hardware-jpeg` (nvImageCodec,
# for `--gpu-jpeg hardware`). Then prove torch is still the
# base's, the GPU decode path imports, and the installed (not copied) packages start.
RUN BEFORE="$(python3 -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')" \
 && python3 -m pip install ".[vertex,hardware-jpeg]" \
 && AFTER="$(python3 -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')" \
 && echo "torch torchvision before: ${BEFORE}; after: ${AFTER}" && test "${BEFORE}" = "${AFTER}" \
 && cd / \
 && python3 -c "import torchvision.io, kfp, kfp.kubernetes, dataflux_pytorch, google.cloud.storage, google.cloud.container_v1, transformers, \
        worker, components.check.component, components.upload.component, components.launch.component, \
        components.aggregate.component, pipelines" \
 && python3 -m worker --help > /dev/null \
 && rm -rf /opt/kfp-batch-inference

# Non-root. KFP's launcher writes artifacts under /gcs, /minio and /s3 (KFP >= 2.2 mounts
# emptyDirs there; these make older backends and plain `docker run` work too). The model cache
# (~/.cache/batch-inference/models) and Hugging Face's cache live in the user's home.
RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash batch \
 && mkdir -p /gcs /minio /s3 /workspace \
 && chmod 1777 /gcs /minio /s3 \
 && chown batch:batch /workspace
USER 10001:10001
ENV HOME=/home/batch \
    HF_HOME=/home/batch/.cache/huggingface
WORKDIR /workspace

# No ENTRYPOINT: the PyTorchJob and KFP each give their own command.
CMD ["python3", "-m", "worker", "--help"]

# ---------------------------------------------------------------------------------------------
FROM ${TASK_BASE_IMAGE} AS tasks

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch from PyTorch's CPU index FIRST and pinned as a constraint: the project's "torch>=2.11" would
# otherwise pull the CUDA build from PyPI (several GB of CUDA libraries the tasks never use).
ARG TORCH_SPEC=torch==2.11.0
RUN python3 -c "import sys; v = sys.version_info[:2]; assert (3, 10) <= v < (3, 13), \
        f'Python {sys.version.split()[0]}: gcs-torch-dataflux needs 3.10 to 3.12'" \
 && python3 -m pip install "${TORCH_SPEC}" --index-url https://download.pytorch.org/whl/cpu \
 && mkdir -p /etc/pip \
 && python3 -c "import importlib.metadata as m; print(f'torch=={m.version(\"torch\")}')" > /etc/pip/base-constraints.txt \
 && cat /etc/pip/base-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip/base-constraints.txt

WORKDIR /opt/kfp-batch-inference
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY components ./components
COPY pipelines ./pipelines

# The project with the `vertex` extra (a launcher on Vertex reads the GKE cluster's endpoint and
# CA); then prove the three components and the worker import from the installed packages.
RUN python3 -m pip install ".[vertex]" \
 && cd / \
 && python3 -c "import torch, kfp, kfp.kubernetes, duckdb, google.cloud.storage, google.cloud.container_v1, \
        components.check.component, components.upload.component, components.launch.component, \
        components.aggregate.component, pipelines; \
        assert not torch.version.cuda, 'the tasks image must hold a CPU build of torch'" \
 && python3 -m worker --help > /dev/null \
 && rm -rf /opt/kfp-batch-inference

RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash batch \
 && mkdir -p /gcs /minio /s3 /workspace \
 && chmod 1777 /gcs /minio /s3 \
 && chown batch:batch /workspace
USER 10001:10001
ENV HOME=/home/batch \
    HF_HOME=/home/batch/.cache/huggingface
WORKDIR /workspace

# No ENTRYPOINT: KFP gives its own command.
CMD ["python3", "-m", "kfp.dsl.executor_main", "--help"]
