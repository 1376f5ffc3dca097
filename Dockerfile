# relay in a container: docker build -t relay . && docker run -p 2525:2525 -p 8025:8025 \
#   -e RELAY_UNSUBSCRIBE_SECRET=... -v relay-data:/var/lib/relay -v ./relay.toml:/etc/relay/relay.toml relay
FROM python:3.11-slim
RUN useradd --system --home /var/lib/relay --create-home relay
WORKDIR /opt/relay
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . && mkdir -p /etc/relay && chown relay /var/lib/relay
COPY relay.toml /etc/relay/relay.toml
ENV RELAY_CONFIG=/etc/relay/relay.toml
USER relay
WORKDIR /var/lib/relay
EXPOSE 2525 8025
STOPSIGNAL SIGTERM
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8025/healthz', timeout=3)"
CMD ["relay", "serve"]
