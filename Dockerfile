# mitoseg on a CUDA runtime: `docker build -t mitoseg .` then
# `docker run --gpus all -v /data:/data mitoseg segment --input zarr:///data/em.zarr/raw --output ...`
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/mitoseg
ENV PATH=/opt/mitoseg/bin:$PATH
# torch first (the CUDA build from PyPI), then the project, so the range in setup.cfg adds nothing.
RUN pip install --upgrade pip && pip install "torch>=2.3"

WORKDIR /opt/mitoseg/src
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY configs ./configs
COPY models ./models
RUN pip install .

# Workers of an external cluster use the same image: `dask worker tcp://scheduler:8786 --resources GPU=1`.
ENTRYPOINT ["mitoseg"]
CMD ["--help"]
