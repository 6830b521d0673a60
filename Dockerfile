# syntax=docker/dockerfile:1
# model-service image. Build: docker build -t model-service .          (CPU, default)
#                              docker build --build-arg VARIANT=cuda -t model-service:cuda .
# The builder installs PyTorch 2.11.0 and links the binary against its libtorch (rpath to
# /opt/venv/.../torch/lib); the runtime image carries only libtorch's shared libraries (and, for
# CUDA, the NVIDIA libraries they load), the binary and model_output/.
#
# Build arguments (README "Deployment", docs/container.md):
#   BUILDER_IMAGE   rust:1-bookworm (default) or any Debian bookworm image: without cargo, Rust comes
#                   from Debian (rustc-web/cargo-web 1.96, bookworm-security: some crates need 1.89)
#   RUNTIME_IMAGE   debian:bookworm-slim (default) or any Debian bookworm image
#   VARIANT         cpu (default) | cuda
#   TORCH_INDEX_URL where VARIANT=cpu finds torch: PyTorch's CPU wheel index (default); empty: PyPI's
#                   Linux wheel, which is CUDA-enabled: it is installed without its dependencies and
#                   reduced to its CPU libraries (libtorch_cpu.so still links the CUDA runtime and
#                   profiler, 5 MB, which load without a GPU). VARIANT=cuda always uses PyPI.
# Caches (BuildKit or podman/buildah): pip's downloads, cargo's registry and target directory, so a
# rebuild after a source change recompiles only what changed.
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG VARIANT=cpu

FROM ${BUILDER_IMAGE} AS builder
ARG VARIANT
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive
# Python for pip; g++ (and its gcc) for build.rs's C++ shim, torch-sys' wrapper and mimalloc; make,
# OpenSSL and zlib headers and pkg-config for the librdkafka that rdkafka-sys builds (./configure &&
# make: no cmake); patchelf for the CPU reduction below; Rust from Debian when the base has no cargo.
# The optional build secret `extra_ca` (PEM) is trusted by pip and cargo in this stage only, for
# networks that intercept TLS.
RUN --mount=type=secret,id=extra_ca set -eu; \
    case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; esac; \
    pkgs="ca-certificates python3 python3-venv g++ make pkg-config libssl-dev zlib1g-dev patchelf"; \
    command -v cargo >/dev/null || pkgs="$pkgs rustc-web cargo-web"; \
    apt-get update; apt-get install -y --no-install-recommends $pkgs; rm -rf /var/lib/apt/lists/*; \
    if [ -s /run/secrets/extra_ca ]; then \
        cp /run/secrets/extra_ca /usr/local/share/ca-certificates/extra_ca.crt; update-ca-certificates; fi; \
    cargo --version; g++ --version | head -n 1
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=cache,target=/root/.cache/pip set -eu; \
    python3 -m venv /opt/venv; pip="/opt/venv/bin/pip install --disable-pip-version-check"; \
    if [ "$VARIANT" = cuda ]; then $pip torch==2.11.0; \
    elif [ -n "$TORCH_INDEX_URL" ]; then $pip --no-deps torch==2.11.0 --index-url "$TORCH_INDEX_URL"; \
    else \
        $pip --no-deps torch==2.11.0 'nvidia-cuda-runtime==13.0.96.*' 'nvidia-cuda-cupti==13.0.85.*'; \
        lib="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/torch/lib"; \
        rm -f "$lib"/libtorch_cuda*.so "$lib"/libc10_cuda.so "$lib"/libcaffe2_nvrtc.so "$lib"/libtorch_nvshmem.so; \
        patchelf --remove-needed libtorch_cuda.so "$lib/libtorch.so"; \
    fi
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY assets assets
COPY src src
# The integration tests' harness: a dev-dependency and workspace member, so cargo reads its manifest.
COPY testkit testkit
# libtorch from the wheel's directory (LIBTORCH), not through `import torch` (.cargo/config.toml's
# LIBTORCH_USE_PYTORCH, its only setting, is left out): the reduced CPU wheel does not import.
RUN --mount=type=cache,target=/src/target,id=model-service-target,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/registry,id=model-service-cargo-registry,sharing=locked \
    --mount=type=cache,target=/root/.cargo/registry,id=model-service-cargo-registry-debian,sharing=locked \
    set -eu; \
    # this step runs only when a copied file changed; the cached target directory may hold a build
    # newer than these files (another checkout's), which cargo's mtime check would take as current
    find src assets testkit build.rs -type f -exec touch {} +; \
    LIBTORCH="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/torch" \
        cargo build --release --locked; \
    mkdir -p /export/usr/local/bin; cp target/release/model-service /export/usr/local/bin/
# Collect the shared libraries at the paths the rpaths name: libtorch's, and the NVIDIA libraries
# (all of them for CUDA; for the reduced CPU wheel the two libtorch_cpu.so links).
RUN set -eu; sp="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
    mkdir -p "/export$sp/torch"; cp -a "$sp/torch/lib" "/export$sp/torch/"; \
    if [ "$VARIANT" = cuda ]; then cp -a "$sp/nvidia" "/export$sp/"; \
    else ldd /export/usr/local/bin/model-service | awk '$3 ~ "^/opt/venv/" {print $3}' | xargs -r realpath -s \
        | while read -r f; do mkdir -p "/export${f%/*}"; cp -a "$f" "/export$f"; done; fi; \
    ! ldd /export/usr/local/bin/model-service | grep "not found"

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libgomp1 libssl3 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 --home /app model-service
COPY --from=builder /export/ /
# Every library the binary links resolves here, and it starts (the build fails otherwise).
RUN ! ldd /usr/local/bin/model-service | grep "not found" && model-service --help >/dev/null
COPY model_output /app/model_output
WORKDIR /app
USER model-service
ENV MODEL_DIR=/app/model_output HOST=0.0.0.0 PORT=8001 DEVICE=auto
EXPOSE 8001
# PORT as the container sets it (host networking moves it off 8001).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT:-8001}/health" || exit 1
ENTRYPOINT ["model-service"]
CMD ["serve"]
