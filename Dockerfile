# syntax=docker/dockerfile:1
# One image for every role: `docker run IMAGE router ...`, or --role / ETLROUTER_ROLE in Kubernetes.
# Build: `make image` (or `docker build -t etlrouter:$(VERSION) .`). See docs/image.md.
ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtual environment with exactly what requirements/runtime.lock pins, then the project's wheel
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
# The venv has no pip of its own: the base's pip installs into it (--python), so none reaches the final image.
RUN python -m venv --without-pip /opt/etlrouter
WORKDIR /src
# Dependencies first (their own layer, cached while only the project's source changes); binary wheels only.
# Extension modules lose their debug symbols (uvloop and asyncpg ship them: about 35 MB); binutils stays in
# this stage; the packages' own tests go.
# Then scripts/image_slim.py: sourceless third-party modules, botocore's models of S3/STS/SSO only, the
# Kubernetes client zipped (docs/image.md).
COPY requirements/runtime.lock requirements/runtime.lock
COPY scripts/image_slim.py /usr/local/lib/image_slim.py
RUN pip --python /opt/etlrouter/bin/python install --no-deps --only-binary=:all: -r requirements/runtime.lock \
 && apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null \
 && find /opt/etlrouter -name '*.so' -exec strip --strip-unneeded {} + \
 && find /opt/etlrouter/lib -depth -type d -name tests -path '*/site-packages/*/tests' -exec rm -rf {} + \
 && python /usr/local/lib/image_slim.py venv /opt/etlrouter
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# The project's wheel without dependencies, a consistency check, then its modules byte-compiled once with
# unchecked-hash .pyc files beside their sources (used as they are: the root file system may be read-only).
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip --python /opt/etlrouter/bin/python install --no-deps --no-compile /wheels/*.whl \
 && pip --python /opt/etlrouter/bin/python check \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/etlrouter/lib/python3*/site-packages/etlrouter

# -- runtime: the base without its packaging tools (pip, setuptools, wheel), and the non-root user:
# uid/gid 10001, home = the data directory, the only place the image expects to write (mount a volume there
# and run with a read-only root file system).
FROM ${PYTHON_IMAGE} AS runtime
COPY scripts/image_slim.py /usr/local/lib/image_slim.py
RUN python /usr/local/lib/image_slim.py base && rm /usr/local/lib/image_slim.py \
 && groupadd --gid 10001 etlrouter \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/etlrouter --no-create-home --shell /usr/sbin/nologin etlrouter \
 && mkdir -p /var/lib/etlrouter && chown 10001:10001 /var/lib/etlrouter && chmod 0750 /var/lib/etlrouter

# -- the image: that runtime as one layer (the tools' files are gone, not hidden under a later layer), the venv
FROM scratch
ARG VERSION=0.1.0
COPY --from=runtime / /
LABEL org.opencontainers.image.title="etlrouter" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="ETL Router: router, sidecar, operator, ctl, dev and connectors in one executable" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/etlrouter/etlrouter"
COPY --from=build /opt/etlrouter /opt/etlrouter
# FROM scratch keeps none of the base's configuration: PATH and LANG as the official image sets them.
ENV PATH=/opt/etlrouter/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    HOME=/var/lib/etlrouter \
    TMPDIR=/var/lib/etlrouter \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ETLROUTER_LOGGING__FORMAT=json
USER 10001:10001
WORKDIR /var/lib/etlrouter
VOLUME ["/var/lib/etlrouter"]
EXPOSE 7400 7480 7500 7580
ENTRYPOINT ["etlrouter"]
CMD ["--help"]
