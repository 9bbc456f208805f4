FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY reco_qdrant ./reco_qdrant
COPY migrations ./migrations
# CPU build of torch for the ingest image; bring your own CUDA image for GPU encoding.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch torchvision \
 && pip install --no-cache-dir .
ENTRYPOINT []
