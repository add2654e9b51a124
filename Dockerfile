# syntax=docker/dockerfile:1
# kvsync's container image: `docker build -t kvsync:dev .` (make image).
# The build stage compiles the extension into a wheel with maturin; the
# runtime stage is a slim Python with only that wheel and its dependencies,
# run as an unprivileged user. Entry point: the `kvsync` command
# (`kvsync serve --config ...` in deploy/, `kvsync sim` for simulated engines).

FROM python:3.12-slim-bookworm AS build
ARG RUST_TOOLCHAIN=stable
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_TOOLCHAIN}"
RUN pip install --no-cache-dir "maturin>=1.7,<2"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md rustfmt.toml ./
COPY rust rust
COPY python python
# The runtime stage has the same Debian and Python: a plain linux wheel fits.
RUN maturin build --release --locked --compatibility linux --out /wheels

FROM python:3.12-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kvsync
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kvsync"]
CMD ["serve"]
