"""The chart under the real helm (``run.sh`` builds it and sets KYB_HELM).

Helm must render, from the chart's default values, exactly the committed manifests, and
from any other deployment exactly what the manifest generator renders from it: the
chart is the manifests' templates, not a copy of them. Values helm must refuse are data
files under ``values/bad/``, each naming on its first line (``# expect: ...``) what
helm's message must contain; the generator refuses each of them too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from codegen import chart, manifests, stubs
from codegen.tests import support

REPO_ROOT = support.REPO_ROOT
HERE = Path(__file__).resolve().parent
CHART = REPO_ROOT / chart.OUTPUT_ROOT
MULTI_POOL = HERE / "values" / "multi-pool.yaml"
BAD = sorted((HERE / "values" / "bad").glob("*.yaml"))
RELEASE = "kyb"

pytestmark = pytest.mark.skipif(
    not os.environ.get("KYB_HELM"), reason="no helm: run conformance/helm/run.sh"
)


def _helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.environ["KYB_HELM"], *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _template(*args: str | Path) -> list[dict[str, Any]]:
    result = _helm("template", RELEASE, CHART, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def _generated(deployment: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """What `python -m codegen manifests` renders with ``deployment`` as its input."""
    for part in (manifests.TEMPLATE_ROOT, manifests.GENERATED_ROOT):
        shutil.copytree(REPO_ROOT / part, tmp_path / part)
    shutil.copy(deployment, tmp_path / manifests.DEPLOYMENT)
    return support.rendered_documents(tmp_path)


def _by_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    named = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    assert len(named) == len(docs), "two objects of one kind share a name"
    return named


def test_the_chart_passes_helm_lint_strict() -> None:
    for values in ((), ("--values", MULTI_POOL)):
        result = _helm("lint", "--strict", CHART, *values)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


def test_default_values_render_the_committed_manifests_field_for_field() -> None:
    committed = [
        doc
        for path in sorted((REPO_ROOT / manifests.OUTPUT_ROOT).glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]
    assert _by_name(_template()) == _by_name(committed)


def test_multi_pool_values_render_what_the_generator_renders_from_them(tmp_path: Path) -> None:
    rendered = _by_name(_template("--values", MULTI_POOL))
    assert rendered == _by_name(_generated(MULTI_POOL, tmp_path))
    kinds = sorted(kind for kind, _ in rendered)
    # The file exercises every template: three pools, metrics with and without a monitor.
    assert kinds.count("DaemonSet") == 3 and kinds.count("Service") == 2
    assert kinds.count("PodMonitor") == 1 and "Namespace" in kinds


@pytest.mark.parametrize("values", [(), ("--values", MULTI_POOL)], ids=["default", "multi-pool"])
def test_every_rendered_object_validates_strictly(values: tuple[str | Path, ...]) -> None:
    docs = _template(*values)
    assert docs
    for doc in docs:
        support.validate(doc)


def test_an_empty_namespace_installs_into_the_release_namespace_without_creating_it() -> None:
    docs = _template("--namespace", "gpu", "--set", "namespace=")
    assert "Namespace" not in {doc["kind"] for doc in docs}
    namespaces = {doc["metadata"].get("namespace") for doc in docs}
    # The admission policy and its binding are cluster-scoped.
    assert namespaces == {"gpu", None}
    scoped = {doc["kind"] for doc in docs if "namespace" not in doc["metadata"]}
    assert scoped == {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


def test_there_are_bad_values_files_to_try() -> None:
    assert len(BAD) >= 8


@pytest.mark.parametrize("values", BAD, ids=[path.stem for path in BAD])
def test_bad_values_are_refused_naming_the_key(values: Path, tmp_path: Path) -> None:
    first = values.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{values.name}: first line names the expected error"
    expected = first.removeprefix("# expect: ")

    result = _helm("template", RELEASE, CHART, "--values", values)

    assert result.returncode != 0
    assert expected in result.stderr
    assert "values don't meet the specifications of the schema" in result.stderr
    # The generator refuses it as well: the schema is no stricter than the manifests.
    with pytest.raises(stubs.CodegenError):
        _generated(_as_deployment(values, tmp_path), tmp_path / "repo")


def _as_deployment(values: Path, tmp_path: Path) -> Path:
    """A values file over the defaults, as helm merges them (a list replaces a list)."""
    defaults = yaml.safe_load((REPO_ROOT / manifests.DEPLOYMENT).read_text())
    merged = {**defaults, **yaml.safe_load(values.read_text())}
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(merged))
    return path
