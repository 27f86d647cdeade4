# syntax=docker/dockerfile:1
#
# A streamer worker image. By default it runs the built-in demo app (streamer.demo:app: topic from
# STREAMER_DEMO_TOPIC, one line per record appended to STREAMER_DEMO_LOG); an application image
# starts FROM this one, installs its own package and sets CMD ["run", "mypkg.consumer:app"].
#
#   docker build -t streamer .
#   docker run --rm -e STREAMER_KAFKA__BOOTSTRAP_SERVERS=broker:9092 \
#       -e STREAMER_KAFKA__GROUP_ID=demo -e STREAMER_DEMO_LOG=/tmp/effects streamer
#
# Settings come from --config FILE and STREAMER_<SECTION>__<KEY> variables (see README.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged uid/gid that Kubernetes' runAsUser/runAsNonRoot can check numerically.
RUN groupadd --system --gid 10001 streamer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin streamer

# confluent-kafka, hiredis and pydantic-core come as manylinux wheels (librdkafka is bundled):
# no compiler needed. The source is removed once installed.
COPY pyproject.toml README.md /tmp/src/
COPY streamer /tmp/src/streamer
RUN pip install /tmp/src && rm -rf /tmp/src

WORKDIR /app
USER 10001:10001

# The metrics endpoint (/metrics, /healthz, /readyz) must be reachable from outside the container.
ENV STREAMER_METRICS__HOST=0.0.0.0
EXPOSE 9400

# Liveness: the loop polled Kafka within max.poll.interval.ms. Follows STREAMER_METRICS__PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMER_METRICS__PORT', '9400'), timeout=4)"]

ENTRYPOINT ["streamer"]
CMD ["run", "streamer.demo:app"]
