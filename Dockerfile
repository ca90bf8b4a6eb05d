# syntax=docker/dockerfile:1
# The operator image: `docker build -t <registry>/workerqueue-operator:<version> .`
#
# `make image` builds the same image without Docker (image/build.py: mmdebstrap, chroot, umoci)
# and reads this file for what it cannot take from elsewhere: the Debian release, the venv path,
# and the final stage's ENV, USER, EXPOSE, ENTRYPOINT, CMD and LABELs. Both install the Debian
# packages named in image/packages.txt (image/build-packages.txt in the builder only) and the
# Python packages locked with hashes in image/requirements.lock. tests/unit/test_dockerfile.py
# fails when the two drift apart.
#
# The base is pinned by its Debian point release. Pin its digest too when building for production
# (debian:12.N-slim@sha256:...): it cannot be looked up offline, so it is not here, and a bot
# (Renovate, Dependabot) should keep both up to date. image/debian.lock records the package
# versions `make image` installed; a docker build takes the mirror's current ones.
ARG DEBIAN_IMAGE=debian:12.15-slim

# -- builder: the package and its dependencies in a virtualenv ---------------------------------
FROM ${DEBIAN_IMAGE} AS builder
RUN --mount=type=bind,source=image,target=/tmp/image \
    apt-get update \
    && grep -hv '^#' /tmp/image/packages.txt /tmp/image/build-packages.txt \
       | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (their layer survives source changes), every file checked against its hash.
COPY image/requirements.lock image/
RUN pip install --require-hashes --no-deps --no-compile -r image/requirements.lock
# pyproject.toml names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY operator ./operator
# Non-editable: the venv holds the package itself, not a link to /src. Its build backend
# (setuptools) comes from the lock, hence no build isolation. The bytecode is compiled once for
# the whole venv, which matters because the final root filesystem is read-only: hash-based and
# unchecked (nothing there ever changes), so that it does not depend on when it was built.
RUN pip install --no-deps --no-build-isolation --no-compile . \
    && python3 -m compileall -q -f --invalidation-mode unchecked-hash /opt/venv/lib \
    && workerqueue-operator --help >/dev/null

# -- final: the venv on a clean base, as a non-root user ----------------------------------------
FROM ${DEBIAN_IMAGE}
RUN --mount=type=bind,source=image,target=/tmp/image \
    apt-get update \
    && grep -hv '^#' /tmp/image/packages.txt | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="workerqueue-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# 65532: the conventional "nonroot" UID/GID; the chart's securityContext runs as the same.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["workerqueue-operator"]
CMD ["run"]
