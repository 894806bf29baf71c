# turnctl on a CUDA PyTorch *devel* image: DeepSpeed JIT-compiles its fused ops, which needs nvcc.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TURNCTL_NO_PROGRESS=0

WORKDIR /work
COPY pyproject.toml README.md ./
COPY turnctl ./turnctl
COPY recipes ./recipes
# torch comes from the base image; everything else from PyPI.
RUN pip install ".[plot,tensorboard]" && turnctl --version

# Mount prepared data at /work/shards and collect runs from /work/runs, e.g.
#   docker run --gpus all --ipc=host -v $PWD/shards:/work/shards -v $PWD/runs:/work/runs \
#       turnctl deepspeed --module turnctl train --recipe clip_l14
CMD ["turnctl", "--help"]
