# syntax=docker/dockerfile:1
# model-service image. Build: docker build -t model-service .          (CPU, default)
#                              docker build --build-arg VARIANT=cuda -t model-service:cuda .
# The builder installs PyTorch 2.11.0 from PyPI and links the binary against its libtorch; the
# runtime image carries only libtorch's shared libraries, the binary and model_output/.
ARG VARIANT=cpu

FROM rust:1-bookworm AS builder
ARG VARIANT
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0
ENV PATH=/opt/venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY .cargo .cargo
COPY src src
RUN cargo build --release --locked
# Collect libtorch (and, for CUDA, the NVIDIA libraries it needs) at the path the rpath names.
RUN set -eu; tl=/opt/venv/lib/python3.11/site-packages/torch/lib; mkdir -p /export$tl; \
    cp -a $tl/libtorch.so $tl/libtorch_cpu.so $tl/libc10.so $tl/libgomp*.so* /export$tl/; \
    if [ "$VARIANT" = cuda ]; then cp -a $tl/. /export$tl/; \
      mkdir -p /export/opt/venv/lib/python3.11/site-packages; \
      cp -a /opt/venv/lib/python3.11/site-packages/nvidia /export/opt/venv/lib/python3.11/site-packages/; \
    else cp -a $tl/libtorch_cuda.so $tl/libc10_cuda.so /export$tl/ 2>/dev/null || true; fi

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 --home /app model-service
COPY --from=builder /export/ /
COPY --from=builder /src/target/release/model-service /usr/local/bin/model-service
COPY model_output /app/model_output
WORKDIR /app
USER model-service
ENV MODEL_DIR=/app/model_output HOST=0.0.0.0 PORT=8001 DEVICE=auto
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8001/health/live || exit 1
ENTRYPOINT ["model-service"]
CMD ["serve"]
