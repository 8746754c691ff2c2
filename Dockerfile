# One image for both services; docker-compose.yml picks the role by command
# (`rx serve` or `tx serve`). Build it once: `docker-compose build`.
FROM python:3.11-slim

# CPU torch from PyTorch's CPU index: the default PyPI wheel would pull CUDA.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY shared ./shared
COPY tx_service ./tx_service
COPY rx_service ./rx_service
# Server dependencies only: no dev tools, no `research` extra (plots, reference scenes).
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /cache --no-create-home splitvlm \
    && mkdir -p /cache /models \
    && chown splitvlm:splitvlm /cache

# Model cache (built-in models, fingerprints) and the Hugging Face cache share one volume.
ENV SPLITVLM_CACHE_DIR=/cache HF_HOME=/cache/huggingface HF_HUB_OFFLINE=1 \
    SPLITVLM_RX_HOST=0.0.0.0 SPLITVLM_TX_HOST=0.0.0.0 PYTHONUNBUFFERED=1
VOLUME /cache
USER splitvlm

# Rx: gRPC 50061, HTTP 8061 (API, /metrics, /docs). Tx: gRPC 50051, /metrics 8051.
EXPOSE 50061 8061 50051 8051
# `splitvlm health` asks the service this container runs (rx or tx, read from its command)
# for its Info over gRPC; exit 0 when it answers.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 CMD ["splitvlm", "health"]
ENTRYPOINT ["splitvlm"]
CMD ["rx", "serve"]
