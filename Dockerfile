# One image for both services; docker-compose.yml picks the role by command.
FROM python:3.11-slim
WORKDIR /app
# CPU torch from PyTorch's CPU index: the default PyPI wheel would pull CUDA.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY shared ./shared
COPY tx_service ./tx_service
COPY rx_service ./rx_service
RUN pip install --no-cache-dir .
ENV SPLITVLM_CACHE_DIR=/cache HF_HUB_OFFLINE=1
VOLUME /cache
ENTRYPOINT ["splitvlm"]
