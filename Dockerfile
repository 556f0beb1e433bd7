# syntax=docker/dockerfile:1
# The plugin image. tests/image/test_install.py performs the same steps in a clean
# virtualenv (no container engine in CI): keep the two in step.
ARG PYTHON_IMAGE=python:3.11-slim

# Build the wheel (package `pkg`, generated gRPC stubs included) and install it with
# its runtime dependencies only into a venv without pip.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY pkg/ /src/pkg/
RUN python -m pip wheel --no-deps --wheel-dir /wheels /src \
 && python -m venv --without-pip /opt/kyb \
 && python -m pip --python /opt/kyb/bin/python install --no-cache-dir /wheels/*.whl

FROM ${PYTHON_IMAGE}
COPY --from=builder /opt/kyb /opt/kyb
# `cmd` is not installed (the standard library's cmd.py would hide it in
# site-packages); `python -m cmd.kyb_device_plugin` runs from /app instead.
COPY cmd/ /app/cmd/
WORKDIR /app
# The root filesystem is read-only in the pod, so nothing may expect to write .pyc.
ENV PATH=/opt/kyb/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# No USER: the plugin runs as root without capabilities, because the kubelet's
# device-plugin directory and sockets belong to root (see the DaemonSet).
ENTRYPOINT ["python", "-m", "cmd.kyb_device_plugin"]
CMD ["serve"]
