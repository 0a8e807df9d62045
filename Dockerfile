# The project's image. It runs:
#   - the worker in the PyTorchJob's pods:  bash -c "... exec torchrun ... -m worker ..."
#   - the three KFP components:              python3 -m kfp.dsl.executor_main ... (kfp's own command)
# Both flavours of the compiled pipeline name it (DEFAULT_IMAGE in components/images.py,
# ghcr.io/example/kfp-batch-inference:0.1.0; override at compile time with BATCH_INFERENCE_IMAGE).
#
#   docker build -t REGISTRY/kfp-batch-inference:0.1.0 .
#
# The base brings CUDA, cuDNN, PyTorch and torchvision (nvjpeg batched decode on the GPU) on a
# Python below 3.13 (gcs-torch-dataflux needs < 3.13). The build keeps the base's torch as it is:
# its exact versions become pip constraints, so pip can never swap it for a PyPI build.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

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
        worker, components.upload.component, components.launch.component, components.aggregate.component, pipelines" \
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
