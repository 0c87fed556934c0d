# rabbitproxy container image.
#
#   docker build -t rabbitproxy .
#   docker run -p 5672:5672 -e RABBITPROXY_BACKENDS=rabbit1:5672,rabbit2:5672,rabbit3:5672 rabbitproxy
#
# Two stages: the builder has pip and the build tools and installs everything into a venv; the final stage gets only
# Debian's Python and that finished venv, which keeps the image small and free of build tooling. docs/deployment.md explains
# the environment variables, the admin API defaults and graceful shutdown.

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# The venv lives at the path it will have in the final image: venvs hard-code their own location.
RUN python3 -m venv /opt/rabbitproxy
WORKDIR /src
# Dependencies get their own layer, keyed on pyproject.toml alone, so a code change does not download them again.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && /opt/rabbitproxy/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY rabbitproxy ./rabbitproxy
# pip and setuptools are only needed to install; the running proxy never imports them.
RUN /opt/rabbitproxy/bin/pip install --no-deps . \
 && /opt/rabbitproxy/bin/pip uninstall -y setuptools pip \
 && /opt/rabbitproxy/bin/rabbitproxy --version

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rabbitproxy \
 && useradd --system --uid 10001 --gid rabbitproxy --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin rabbitproxy \
 && mkdir -p /etc/rabbitproxy
COPY --from=builder /opt/rabbitproxy /opt/rabbitproxy
# No .pyc files written at run time (the image's are compiled at install), unbuffered logs for `docker logs`.
ENV PATH=/opt/rabbitproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 5672 9080
# The probe asks the admin API's /healthz (which needs no token). It finds the admin address the way `serve` does:
# the config file's admin.listen, else RABBITPROXY_ADMIN_LISTEN, else 127.0.0.1:9080; RABBITPROXY_ADMIN overrides.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["rabbitproxy", "healthcheck", "--quiet"]
# The proxy itself is PID 1: it handles SIGTERM (drain, then exit 0), so no init shim is needed.
ENTRYPOINT ["rabbitproxy"]
# Without this file but with RABBITPROXY_BACKENDS set, `serve` builds a one-service config from the environment.
CMD ["serve", "--config", "/etc/rabbitproxy/rabbitproxy.toml"]
