# turnctl on a CUDA PyTorch *runtime* image. turnctl needs no DeepSpeed JIT op on GPUs: its
# optimizers are torch's own (also under ZeRO-Offload), collectives go through NCCL, and exports
# are evaluated without DeepSpeed. A devel image (nvcc) is only needed for DeepSpeed features that
# compile ops, e.g. a --deepspeed config with NVMe offload or DeepSpeed's fused optimizers:
#   docker build --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel -t turnctl .
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    MPLCONFIGDIR=/tmp/matplotlib

# torch comes from the base image; everything else from PyPI. The package is installed as root,
# read-only to the user that runs it.
WORKDIR /opt/turnctl
COPY pyproject.toml README.md ./
COPY turnctl ./turnctl
COPY recipes ./recipes
RUN pip install ".[plot,tensorboard,mlflow,wandb]" && turnctl --version

# Runs as an unprivileged user; files it writes into mounted folders belong to uid 1000 (pass
# `--user $(id -u):$(id -g)` to write as yourself). /work is where data and runs are mounted,
# /cache the Hugging Face hub cache (mount yours to reuse downloaded weights).
RUN useradd --create-home --uid 1000 turnctl \
    && mkdir -p /work /cache/huggingface /cache/torch_extensions \
    && chown -R turnctl:turnctl /work /cache \
    && chmod -R a+rwX /cache
USER turnctl
WORKDIR /work

#   docker run --gpus all --ipc=host \
#       -v $PWD/shards:/work/shards -v $PWD/runs:/work/runs -v ~/.cache/huggingface:/cache/huggingface \
#       turnctl deepspeed turnctl train --recipe clip_l14
CMD ["turnctl", "--help"]
