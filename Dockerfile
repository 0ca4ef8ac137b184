# The platform's services (gateway, scheduler, projections; docker-compose.yml picks one by its command).
# No engines: the services never import torch.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 fabric && mkdir /data && chown fabric /data
WORKDIR /app
COPY pyproject.toml README.md nats.conf ./
COPY sdk sdk
COPY gateway gateway
COPY scheduler scheduler
COPY projections projections
COPY worker worker
RUN pip install --no-cache-dir .

USER fabric
ENV PYTHONUNBUFFERED=1 GF_SECRETS_DIR=/data/secrets
VOLUME /data
EXPOSE 8000
# The gateway's own check; docker-compose.yml gives the other services theirs.
HEALTHCHECK --interval=10s --timeout=5s --retries=6 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"
CMD ["python", "-m", "gateway", "--host", "0.0.0.0", "--http-port", "8000", "--secrets-dir", "/data/secrets"]
