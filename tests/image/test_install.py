"""The image build, without a container engine: the Dockerfile's own steps, run here.

There is no Docker in CI, so this test reads the Dockerfile and performs its
instructions in a scratch directory that stands in for the image's root: the builder
stage's COPY and RUN (wheel, clean venv, runtime dependencies only), then the final
stage's COPY, WORKDIR, ENV and ENTRYPOINT. Absolute paths of the Dockerfile are taken
below that root and ``python`` is this interpreter; everything else is the Dockerfile's
text, so the two cannot drift apart. pip's cache is reused, so it takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
# Environment that pip needs to reach an index the way the machine is set up to.
_PASSED_ENV = ("HOME", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
_PASSED_ENV_PREFIXES = ("PIP_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy")
# What only the test and codegen extras bring; none of it belongs in the image.
_DEV_ONLY = ("pytest", "hypothesis", "grpc_tools", "mypy_protobuf", "mypy", "ruff", "pip", "jinja2")


@dataclass
class Stage:
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [text for word, text in self.instructions if word == keyword]


def _stages(dockerfile: Path) -> list[Stage]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            words = rest.split()
            stages.append(Stage(words[2] if len(words) == 3 else None))
        elif stages:
            stages[-1].instructions.append((keyword.upper(), rest.strip()))
    return stages


class ImageRoot:
    """A directory standing in for ``/`` of the image being built."""

    def __init__(self, root: Path, python: Path) -> None:
        self.root = root
        self.base_env = {
            key: value
            for key, value in os.environ.items()
            if key in _PASSED_ENV or key.startswith(_PASSED_ENV_PREFIXES)
        }
        self.base_env["PATH"] = f"{python.parent}:{os.environ['PATH']}"
        self.env = dict(self.base_env)
        self.cwd = root

    def start_stage(self) -> None:
        """A stage starts from the base image: no ENV or WORKDIR of another stage."""
        self.env = dict(self.base_env)
        self.cwd = self.root

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def rebase(self, text: str) -> str:
        """Absolute paths in an instruction, moved below the stand-in root."""
        return re.sub(r"""(?<=[\s=:"'])/(?=[A-Za-z])""", f"{self.root}/", f" {text}")[1:]

    def copy(self, args: str, ignore: list[str]) -> None:
        """COPY from the build context: a directory's contents, or files into a dir/."""
        *sources, dest = shlex.split(args)
        for source in sources:
            origin = REPO_ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, self.path(dest), ignore=shutil.ignore_patterns(*ignore))
            else:
                target = self.path(dest) / origin.name if dest.endswith("/") else self.path(dest)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, target)

    def set_env(self, args: str) -> None:
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            self.env[key] = self.rebase(value).replace("$PATH", self.env["PATH"])

    def run(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=300
        )


def _ignored_names(dockerignore: Path) -> list[str]:
    # The Dockerfile copies named paths only; what `**/NAME` drops inside them matters.
    return [
        line.removeprefix("**/").rstrip("/")
        for line in dockerignore.read_text().splitlines()
        if line.startswith("**/")
    ]


def _python_shim(directory: Path) -> Path:
    """``python`` for the RUN steps: this interpreter, as the base image's python."""
    directory.mkdir()
    shim = directory / "python"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    return shim


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageRoot:
    """The Dockerfile's stages performed into one stand-in root."""
    scratch = tmp_path_factory.mktemp("image")
    root = ImageRoot(scratch / "root", _python_shim(scratch / "bin"))
    ignore = _ignored_names(DOCKERIGNORE)
    builder, final = _stages(DOCKERFILE)
    assert builder.name == "builder" and final.name is None

    root.start_stage()
    for args in builder.args("ENV"):
        root.set_env(args)
    for args in builder.args("COPY"):
        root.copy(args, ignore)
    for command in builder.args("RUN"):
        result = root.run(["sh", "-c", root.rebase(command)])
        assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"

    root.start_stage()
    for args in final.args("COPY"):
        if args.startswith("--from=builder "):
            # Same absolute path in both stages, and here both are one root.
            _, source, dest = args.split()
            assert source == dest and root.path(source).is_dir()
        else:
            root.copy(args, ignore)
    for args in final.args("ENV"):
        root.set_env(args)
    (workdir,) = final.args("WORKDIR")
    root.cwd = root.path(workdir)
    return root


def _entrypoint() -> list[str]:
    _, final = _stages(DOCKERFILE)
    (entrypoint,) = final.args("ENTRYPOINT")
    command: list[str] = json.loads(entrypoint)
    return command


def test_the_image_serves_by_default_from_app() -> None:
    _, final = _stages(DOCKERFILE)
    assert _entrypoint() == ["python", "-m", "cmd.kyb_device_plugin"]
    assert [json.loads(cmd) for cmd in final.args("CMD")] == [["serve"]]
    assert final.args("WORKDIR") == ["/app"]
    assert final.args("USER") == []  # root without capabilities; see the DaemonSet


def test_the_wheel_holds_the_package_and_its_stubs_but_no_tests_and_no_cmd(
    image: ImageRoot,
) -> None:
    (wheel,) = image.path("/wheels").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/")[0] for name in names} == {"pkg", dist_info}
    assert not [name for name in names if "/tests/" in name or name.startswith("tests/")]
    assert "pkg/deviceplugin/api/deviceplugin/v1beta1/api_pb2.py" in names
    assert "pkg/deviceplugin/api/podresources/v1/api_pb2_grpc.py" in names
    assert "pkg/deviceplugin/py.typed" in names
    assert any(name.startswith("pkg/deviceplugin/nvml/fixtures/") for name in names)


def test_the_venv_holds_runtime_dependencies_only(image: ImageRoot) -> None:
    present = "import sys, importlib.util as u; print(*filter(u.find_spec, sys.argv[1:]))"
    found = image.run(["python", "-c", present, *_DEV_ONLY])
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == []
    imports = "import grpc, pynvml, pydantic, yaml, prometheus_client, inotify_simple"
    runtime = image.run(["python", "-c", imports])
    assert runtime.returncode == 0, runtime.stderr


def test_help_runs_from_the_image_workdir(image: ImageRoot) -> None:
    result = image.run([*_entrypoint(), "--help"])
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "healthz" in result.stdout


def test_plan_runs_from_the_image_workdir_against_a_mock_node(image: ImageRoot) -> None:
    result = image.run([*_entrypoint(), "plan", "--nvml-mock", "dgx-a100"])
    assert result.returncode == 0, result.stderr
    assert "kyb.ai/gpu-1x-seat" in result.stdout
    assert "GPU7" in result.stdout


def test_the_liveness_probe_command_fails_when_no_plugin_answers(
    image: ImageRoot, tmp_path: Path
) -> None:
    # The DaemonSet's probe is this command; with no sockets it must say so and exit 1.
    result = image.run([*_entrypoint(), "healthz", "--kubelet-dir", str(tmp_path)])
    assert result.returncode == 1
    assert "unhealthy: kyb.ai/gpu-1x-seat" in result.stderr


def test_the_entrypoint_runs_this_image_not_the_checkout(image: ImageRoot) -> None:
    where = image.run(["python", "-c", "import pkg.deviceplugin; print(pkg.deviceplugin.__file__)"])
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(image.path("/opt/kyb"))
