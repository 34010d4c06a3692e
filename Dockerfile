# syntax=docker/dockerfile:1
# One image for the Ray head, the Ray workers, RayJob submitters and Ray Serve (infra/README.md):
#   docker build -t REGISTRY/ldm-pipeline:0.1.0-ray2.60.0 .
#
# Base: Ray's own image at the Ray version pinned in pyproject.toml, for Python 3.11, with CUDA.
# Ray tags images {ray version}-py{python}-cu{cuda}; tests/test_infra.py checks the Ray version here,
# in the manifests' rayVersion and in the image tag against pyproject.toml. Tags can be re-pushed:
# for reproducible builds pin the digest as well, e.g.
#   rayproject/ray:2.60.0-py311-cu128@sha256:<digest>
# (`docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cu128` prints it).
# torch==2.14.1 from PyPI brings its own CUDA 13.0 runtime libraries, so torch does not use the
# base's toolkit, but the GPU nodes' driver must support CUDA 13. Only ops compiled at run time
# (DeepSpeed's fused Adam) use the base's nvcc and need it to match torch's CUDA: if Ray publishes a
# cu130 tag for this version, prefer it; otherwise keep DeepSpeed on torch's own Adam.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# The Ray image's `ray` user (uid 1000, group 100 "users") owns its Python environment, so pip runs
# as that user and nothing here needs root. Numeric, so that Kubernetes can verify runAsNonRoot.
USER 1000:100
RUN mkdir -p /home/ray/app
WORKDIR /home/ray/app
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, read from pyproject.toml alone: editing the code then reuses this layer
# instead of reinstalling torch and DeepSpeed.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself (pinned dependencies already satisfied), then the job entry points and their
# configs. The working directory is what RayJob's runtime_env `working_dir` ships to the workers.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 pipeline/ pipeline/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info
COPY --chown=1000:100 jobs/ jobs/

# No CMD: KubeRay supplies the `ray start` command for every container it creates.
