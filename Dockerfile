# mapl's container image: mapld, mapl-health and the Python package `mapl`, installed from the
# Debian package (deploy/package) that the first stage builds. deploy/image.sh builds it with
# buildah (the only builder it has been run with); a run with docker would look like
#
#   docker run -v $PWD/stage0.textproto:/etc/mapl/mapld.textproto:ro -p 7000:7000 mapl
#
# The config's local_socket belongs in /run/mapl (the health check asks /run/mapl/mapld.sock);
# a trainer in another container shares that volume and must run as the daemon's uid (the local
# socket checks its peer's uid): the image runs as the system user `mapl`.
#
# Targets: runtime (the default image) and trainer (runtime + PyTorch + examples/). The code is
# built for x86-64-v3 (AVX2; CMake's MAPL_ARCH), as the package is.
#
# BASE: the image the package is installed on. The package's Depends are Debian 12 (bookworm)
# packages (libgrpc++1.51, libprotobuf32, libabsl20220623, ...), so BASE must be Debian 12.
# NVIDIA's nvidia/cuda images are built on Ubuntu and on RHEL-family bases (UBI, Rocky Linux), not
# on Debian, and a package built against Debian 12's libraries is not one for Ubuntu's. The CUDA
# base that fits is debian:bookworm-slim plus NVIDIA's CUDA apt repository for Debian 12
# (https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/, added with its
# cuda-keyring package) and the runtime libraries a trainer needs (cuda-cudart-12-<minor>,
# libcublas-12-<minor>, ...); build that as e.g. mapl-cuda-base and pass
# --build-arg BASE=mapl-cuda-base. The host's driver comes in through the NVIDIA Container
# Toolkit. mapld has no CUDA backend yet, and Debian 12's python3-torch is CPU-only, so today
# only a trainer that brings its own CUDA build of PyTorch needs it. Untested: the machine this
# was written on has no GPU and no registry.
ARG BASE=debian:bookworm-slim

# ---- build: the Debian package, as deploy/package.sh builds it, without tests and benchmarks ----
FROM debian:bookworm-slim AS build
# The subset of deploy/install-deps.sh the package needs; `file`: CPack's dpkg-shlibdeps step.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config file \
      libabsl-dev libopenblas-dev libxxhash-dev \
      libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc \
      prometheus-cpp-dev pybind11-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG JOBS=2
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DMAPL_BUILD_TESTS=OFF -DMAPL_BUILD_BENCH=OFF -DMAPL_BUILD_PYTHON=ON \
 && ninja -C /build -j"$JOBS" \
 && cpack --config /build/CPackConfig.cmake -B /build/package \
 && rm -rf /build/package/_CPack_Packages

# ---- runtime: the package on BASE; apt resolves its Depends from the archive ----
FROM ${BASE} AS runtime
COPY --from=build /build/package/mapl_*.deb /tmp/
# The package's postinst creates the system user mapl (useradd: no systemd-sysusers here).
RUN apt-get update \
 && apt-get install -y --no-install-recommends /tmp/mapl_*.deb \
 && rm -rf /var/lib/apt/lists/* /tmp/mapl_*.deb \
 && id mapl \
 && install -d -o mapl -g mapl -m 0750 /run/mapl /var/lib/mapl \
 && install -d -m 0755 /etc/mapl
# Conventional ports: the peer link (peer_listen) and Prometheus metrics (metrics_address); the
# config decides the real ones.
EXPOSE 7000 9400
# /run/mapl: the local socket, shared with a trainer container; /var/lib/mapl: state_dir.
VOLUME ["/run/mapl", "/var/lib/mapl"]
WORKDIR /var/lib/mapl
USER mapl
# Liveness, not readiness: a daemon whose peer is away or restarting is not ready, but restarting
# it does not bring the peer back; Docker (Swarm, autoheal) should act only when the process
# stops serving. Readiness (`mapl-health --socket ...` with no --service)
# is for Kubernetes readinessProbes and compose depends_on.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["mapl-health", "--socket", "/run/mapl/mapld.sock", "--service", "liveness"]
ENTRYPOINT ["mapld"]
CMD ["--config", "/etc/mapl/mapld.textproto"]

# ---- trainer: the runtime plus Debian's PyTorch (CPU) and the examples, for a trainer that ----
# ---- runs next to its daemon as the same user ----
FROM runtime AS trainer
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-torch \
 && rm -rf /var/lib/apt/lists/*
COPY examples /opt/mapl/examples
USER mapl
ENTRYPOINT []
CMD ["python3", "/opt/mapl/examples/llama_pipeline/run.py", "--help"]
