# syntax=docker/dockerfile:1
# The operator image: `docker build -t <registry>/workerqueue-operator:<version> .`
#
# The base is pinned by its full version tag. Pin its digest too when building for production
# (python:3.11.13-slim-bookworm@sha256:...): it cannot be looked up offline, so it is not here, and
# a bot (Renovate, Dependabot) should keep both up to date.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# -- builder: the package and its dependencies in a virtualenv ---------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# pyproject.toml names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY operator ./operator
# Non-editable: the venv holds the package itself, not a link to /src. pip compiles the bytecode,
# which matters because the final root filesystem is read-only.
RUN pip install . \
    && workerqueue-operator --help >/dev/null

# -- final: the venv on a clean base, as a non-root user ----------------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=builder /opt/venv /opt/venv
# 65532: the conventional "nonroot" UID/GID; the chart's securityContext runs as the same.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["workerqueue-operator"]
CMD ["run"]
