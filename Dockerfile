# syntax=docker/dockerfile:1
# model-service image. Build: docker build -t model-service .          (CPU, default)
#                              docker build --build-arg VARIANT=cuda -t model-service:cuda .
# The builder installs PyTorch 2.11.0 and links the binary against its libtorch (rpath to
# /opt/venv/.../torch/lib); the runtime image carries only libtorch's shared libraries (and, for
# CUDA, the NVIDIA libraries they load), the binary and model_output/.
# CPU: torch from PyTorch's CPU wheel index (PyPI's Linux wheel is CUDA-enabled, and a binary linked
# against it needs the CUDA libraries at run time). CUDA: torch from PyPI.
ARG VARIANT=cpu

FROM rust:1-bookworm AS builder
ARG VARIANT
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && if [ "$VARIANT" = cuda ]; then /opt/venv/bin/pip install --no-cache-dir torch==2.11.0; \
       else /opt/venv/bin/pip install --no-cache-dir torch==2.11.0 --index-url https://download.pytorch.org/whl/cpu; fi
ENV PATH=/opt/venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY .cargo .cargo
COPY src src
# The integration tests' harness: a dev-dependency and workspace member, so cargo reads its manifest.
COPY testkit testkit
RUN cargo build --release --locked
# Collect the shared libraries at the paths the rpaths name.
RUN set -eu; sp=/opt/venv/lib/python3.11/site-packages; mkdir -p /export$sp/torch; \
    cp -a $sp/torch/lib /export$sp/torch/; \
    if [ "$VARIANT" = cuda ]; then cp -a $sp/nvidia /export$sp/; fi

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libgomp1 libssl3 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 --home /app model-service
COPY --from=builder /export/ /
COPY --from=builder /src/target/release/model-service /usr/local/bin/model-service
COPY model_output /app/model_output
WORKDIR /app
USER model-service
ENV MODEL_DIR=/app/model_output HOST=0.0.0.0 PORT=8001 DEVICE=auto
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8001/health || exit 1
ENTRYPOINT ["model-service"]
CMD ["serve"]
