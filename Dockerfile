# One image for the three services of the chain: kv-updater, api-server and
# demo-publisher (console scripts on PATH; `python -m <package>` works too).
#
#   docker build --pull=false -t redis-first-chain .
#   docker run --rm redis-first-chain kv-updater --help
#
# The default command is api-server (port 8000). The HEALTHCHECK fetches
# $HEALTH_URL if set, else /live on $METRICS_PORT when that is set and not 0
# (a kv-updater: its health endpoints are off unless METRICS_PORT is given),
# else /live on $PORT (the api-server). The demo publisher has no HTTP port:
# run it with --no-healthcheck (compose: healthcheck: disable: true).
#
# Dependencies come, at the versions in constraints.txt (the set the test suite
# passed with), from the package index pip is given (PyPI by default;
# --build-arg PIP_INDEX_URL=... for a mirror). For an offline build, put wheels
# of every dependency in build/docker-wheels/ (bash deploy/docker-wheels.sh) and
# pass --build-arg PIP_NO_INDEX=1: pip then installs from that folder only.
# The venv keeps its bytecode (start-up about 1 s instead of 3 s; the root file
# system may be read-only, so nothing could be cached at run time).

ARG PYTHON_IMAGE=python:3.12-slim

# ---- build: a virtual environment holding the project and its dependencies
FROM ${PYTHON_IMAGE} AS build
ARG PIP_NO_INDEX=0
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/src/build/docker-wheels
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY . /src
RUN /opt/venv/bin/pip install --no-cache-dir --constraint /src/constraints.txt /src \
    && /opt/venv/bin/python -c "import kv_updater, api_server, demo_publisher" \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools wheel \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---- runtime: the venv on a clean base, run by an unprivileged user
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="redis-first-chain" \
      org.opencontainers.image.description="Redis-first real-time data chain: kv-updater, api-server, demo-publisher" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8000 \
    HEALTH_URL=""
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=4s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os,urllib.request as u; e=os.environ.get; m=e('METRICS_PORT') or '0'; u.urlopen(e('HEALTH_URL') or 'http://127.0.0.1:%s/live' % (m if m != '0' else e('PORT') or '8000'), timeout=3).read()"]
CMD ["api-server"]
