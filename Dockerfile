# One image for both daemons: `twistd -n gradesvc` or `twistd -n lbsvc`.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
FROM ${PYTHON_IMAGE}
# Read by PyPy only (PYTHON_IMAGE=pypy:3.9-slim-bookworm, the fast runtime for lbsvc): its default GC nursery
# cost lbsvc a third of its throughput. CPython ignores it.
ENV PYPY_GC_NURSERY=16M
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY svckit ./svckit
COPY txrabbitstream ./txrabbitstream
COPY gradesvc ./gradesvc
COPY lbsvc ./lbsvc
COPY twistd_plugins ./twistd_plugins
RUN pip install --no-cache-dir . && twistd --help | grep -q gradesvc && twistd --help | grep -q lbsvc
COPY docker/servers.yaml /app/servers.yaml
RUN useradd --system --home /data app && mkdir -p /data && chown app /data
USER app
WORKDIR /data
ENTRYPOINT ["twistd", "-n", "--pidfile=", "--logfile=-"]
