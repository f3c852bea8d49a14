# arpipe on CUDA nodes: torch, DeepSpeed with its CUDA ops compiled in, Ray, MLflow, arpipe.
# The image of every node in cluster/aws.yaml and cluster/kuberay/*.yaml:
#
#   docker build -t ghcr.io/arpipe/arpipe:0.1.0-ray2.60.0-cu128 .
#   docker build --build-arg CUDA_VERSION=12.6.3 --build-arg TORCH_CUDA=cu126 \
#       -t ghcr.io/arpipe/arpipe:0.1.0-ray2.60.0-cu126 .
#
# The devel base (nvcc, headers) stays in the final image on purpose: DeepSpeed JIT-compiles
# any op not prebuilt below on first use, and that must work on a cluster node too.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION}

# torch's wheel index for this CUDA (cu126, cu128, ...): must match CUDA_VERSION's major.minor
ARG TORCH_CUDA=cu128
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
ARG RAY_VERSION=2.60.0
# GPUs the prebuilt DeepSpeed ops run on: A100 8.0, A10/3090 8.6, L4/L40S/4090 8.9, H100/H200 9.0 (+PTX: newer)
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX"
# DeepSpeed ops compiled now rather than on every node at first use. DS_BUILD_OPS=1 would try
# all of them and fail on those this CUDA/torch pair cannot build; these are the ones ZeRO
# training with (CPU-)offload and async I/O uses.
ARG DS_BUILD_OPS=0
ARG DS_BUILD_FUSED_ADAM=1
ARG DS_BUILD_FUSED_LAMB=1
ARG DS_BUILD_CPU_ADAM=1
ARG DS_BUILD_UTILS=1
ARG DS_BUILD_AIO=1
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# wget and bash: KubeRay's readiness probes; rsync/openssh-client: the Ray cluster launcher;
# libaio-dev: DeepSpeed's async I/O op (NVMe offload). Not pinned: Ubuntu replaces package
# versions within a release, so pins would break rebuilds; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv build-essential ninja-build git libaio-dev \
        wget curl ca-certificates bash rsync openssh-client tini \
    && rm -rf /var/lib/apt/lists/*

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install "pip>=24" "setuptools>=68" "wheel>=0.42" "packaging>=23" "ninja>=1.11"

# torch first, from the CUDA index: `pip install .` below then keeps this build
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

# --no-build-isolation: the ops compile against the torch just installed, not a fresh CPU one
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
    DS_BUILD_OPS="${DS_BUILD_OPS}" DS_BUILD_FUSED_ADAM="${DS_BUILD_FUSED_ADAM}" \
    DS_BUILD_FUSED_LAMB="${DS_BUILD_FUSED_LAMB}" DS_BUILD_CPU_ADAM="${DS_BUILD_CPU_ADAM}" \
    DS_BUILD_UTILS="${DS_BUILD_UTILS}" DS_BUILD_AIO="${DS_BUILD_AIO}" \
    pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
    && ds_report

# Ray's version must equal the one the cluster configs name (and pyproject pins)
RUN pip install "ray[default,train]==${RAY_VERSION}"

# every runtime dependency pyproject.toml names (mlflow, boto3, pyarrow, av, ...) and its `examples` extra
# (what the shipped examples import: scikit-learn, nilearn), in a layer that edits to arpipe's source do not
# invalidate; torch and deepspeed above already satisfy theirs
WORKDIR /opt/arpipe/src
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["examples"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# arpipe itself (the folders install as arpipe.*, see pyproject.toml)
COPY arpipe ./arpipe
COPY schemas ./schemas
COPY pipeline ./pipeline
COPY stages ./stages
COPY cluster ./cluster
RUN pip install --no-deps . \
    && python -c "import torch, deepspeed, ray, mlflow, arpipe.pipeline.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)"
COPY examples /opt/arpipe/examples

# a non-root user, uid 1000 as the KubeRay manifests' securityContext says; named and homed
# like Ray's own images (/home/ray) so ~/.ray/auth_token and the launcher's paths line up
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && echo "export PATH=/opt/venv/bin:\$PATH" >> /home/ray/.bashrc
# numeric, so Kubernetes' runAsNonRoot can verify it
USER 1000:1000
WORKDIR /home/ray

EXPOSE 6379 8265 10001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["bash"]
