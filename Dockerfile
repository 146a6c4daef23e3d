# One image for the Dask scheduler, the GPU workers and the mitoseg client (segment, instances, view, train).
#   GPU (default): docker build -t mitoseg:0.1.0 .
#   CPU only:      docker build -t mitoseg:0.1.0-cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#   Run:           docker run --gpus all -v /data:/data mitoseg:0.1.0 segment --input /data/em.zarr/raw --output ...
#   Worker:        docker run --gpus all --entrypoint dask mitoseg:0.1.0 worker tcp://scheduler:8786 --nthreads 1
# torch from PyPI is a CUDA build that carries its own CUDA libraries (torch 2.13: CUDA 13, host driver >= 580), so
# the base image needs no CUDA toolkit.
FROM python:3.11.14-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/mitoseg/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/mitoseg \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin mitoseg

# Dependencies first, in their own layers: editing the source does not reinstall them.
RUN if [ -n "$TORCH_INDEX" ]; then export PIP_INDEX_URL="$TORCH_INDEX"; fi \
    && pip install torch==${TORCH_VERSION}
# The requirements and the cloud extra (zarr on s3:// and gs://), at the tested versions of constraints.txt.
COPY setup.cfg constraints.txt /tmp/
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('/tmp/setup.cfg'); \
print(c['options']['install_requires'].strip()); print(c['options.extras_require']['cloud'].strip())" \
    > /tmp/requirements.txt \
    && pip install --constraint /tmp/constraints.txt --requirement /tmp/requirements.txt

# The project itself, with its shipped checkpoints and example jobs as package data.
WORKDIR /opt/mitoseg/src
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY configs ./configs
RUN pip install --no-deps . && mitoseg --version

USER 10001
WORKDIR /home/mitoseg
ENTRYPOINT ["mitoseg"]
CMD ["--help"]
