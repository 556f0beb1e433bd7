"""The chart and the schemas without helm: fresh, one source with the manifests, and
schemas that say what the plugin's loader and the generator say.

``conformance/helm`` renders the chart with the real helm; here the values schema is
checked with jsonschema against the same values files, so a machine without Go still
sees a schema that accepts the defaults and refuses each bad file.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from codegen import __main__ as cli
from codegen import chart, manifests, schema
from codegen.tests import support
from pkg.deviceplugin.config import loader
from pkg.deviceplugin.config.model import builtin_default

REPO_ROOT = support.REPO_ROOT
VALUES = REPO_ROOT / "conformance/helm/values"
BAD = sorted((VALUES / "bad").glob("*.yaml"))
PROFILE = {"resource": "kyb.ai/gpu-1x-seat", "seatsPerGroup": 2}


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """Every input and output of both generators, copied so a test may change them."""
    for part in (manifests.TEMPLATE_ROOT, manifests.GENERATED_ROOT, chart.OUTPUT_ROOT):
        shutil.copytree(REPO_ROOT / part, tmp_path / part)
    for file in (manifests.DEPLOYMENT, "pyproject.toml"):
        shutil.copy(REPO_ROOT / file, tmp_path / file)
    return tmp_path


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _validator(value: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(value)
    return jsonschema.Draft202012Validator(value)


# --- one source -------------------------------------------------------------------------


def test_committed_chart_is_fresh() -> None:
    assert chart.check(REPO_ROOT) == []
    assert cli.main(["chart", "--check"]) == 0


def test_a_template_change_makes_the_manifests_and_the_chart_stale_until_both_regenerate(
    repo_copy: Path,
) -> None:
    template = repo_copy / manifests.TEMPLATE_ROOT / "daemonset.yaml.j2"
    text = template.read_text()
    assert "terminationGracePeriodSeconds: 30" in text
    template.write_text(
        text.replace("terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 20")
    )

    assert [line.split(":")[0] for line in manifests.check(repo_copy)] == [
        f"{manifests.OUTPUT_ROOT}/daemonset.yaml"
    ]
    assert [line.split(":")[0] for line in chart.check(repo_copy)] == [
        f"{chart.OUTPUT_ROOT}/templates/daemonset.yaml"
    ]
    assert all("python -m codegen chart" in line for line in chart.check(repo_copy))

    manifests.write(repo_copy)
    assert chart.check(repo_copy) != []  # regenerating one is not enough
    chart.write(repo_copy)

    assert manifests.check(repo_copy) == [] and chart.check(repo_copy) == []
    rendered = (repo_copy / chart.OUTPUT_ROOT / "templates/daemonset.yaml").read_text()
    assert "terminationGracePeriodSeconds: 20" in rendered


def test_a_deployment_change_makes_the_chart_values_stale(repo_copy: Path) -> None:
    deployment = repo_copy / manifests.DEPLOYMENT
    deployment.write_text(deployment.read_text().replace("seatsPerGroup: 4", "seatsPerGroup: 5"))

    assert [line.split(":")[0] for line in chart.check(repo_copy)] == [
        f"{chart.OUTPUT_ROOT}/values.yaml"
    ]


def test_the_chart_values_are_the_deployment_file() -> None:
    values = _load(REPO_ROOT / chart.OUTPUT_ROOT / "values.yaml")
    assert values == _load(REPO_ROOT / manifests.DEPLOYMENT)


def test_chart_yaml_is_a_v2_chart_versioned_as_the_project() -> None:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    meta = _load(REPO_ROOT / chart.OUTPUT_ROOT / "Chart.yaml")
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "kyb-device-plugin"
    assert meta["version"] == meta["appVersion"] == version


def test_every_chart_template_comes_from_a_manifest_template() -> None:
    templates = {path.name for path in (REPO_ROOT / chart.OUTPUT_ROOT / "templates").iterdir()}
    from_manifests = {name.removesuffix(".j2") for name in manifests.FILES.values()}
    assert templates == from_manifests | {"_helpers.tpl"}


# --- the values schema ------------------------------------------------------------------


def _values_validator() -> jsonschema.Draft202012Validator:
    committed = _load(REPO_ROOT / chart.OUTPUT_ROOT / "values.schema.json")
    assert committed == schema.values_schema()
    return _validator(committed)


@pytest.mark.parametrize(
    "values", [REPO_ROOT / manifests.DEPLOYMENT, VALUES / "multi-pool.yaml"], ids=lambda p: p.stem
)
def test_the_values_schema_accepts_what_the_generator_renders(values: Path) -> None:
    assert list(_values_validator().iter_errors(_load(values))) == []


def test_there_are_bad_values_files_to_try() -> None:
    assert len(BAD) >= 8


@pytest.mark.parametrize("values", BAD, ids=[path.stem for path in BAD])
def test_the_values_schema_refuses_each_bad_values_file_at_its_key(values: Path) -> None:
    expected = values.read_text().splitlines()[0].removeprefix("# expect: at '").split("'")[0]
    merged = {**_load(REPO_ROOT / manifests.DEPLOYMENT), **_load(values)}

    errors = list(_values_validator().iter_errors(merged))

    assert errors
    pointers = {
        "/" + "/".join(str(part).replace("/", "~1") for part in error.absolute_path)
        for error in errors
    }
    assert any(pointer.startswith(expected) or expected.startswith(pointer) for pointer in pointers)
    assert any(pointer.count("/") >= 2 for pointer in pointers)  # names the key, not just /pools


# --- the config schema ------------------------------------------------------------------


def _config_validator() -> jsonschema.Draft202012Validator:
    committed = _load(REPO_ROOT / manifests.CONFIG_SCHEMA)
    assert committed == schema.config_schema()
    return _validator(committed)


def _loader_accepts(data: dict[str, Any]) -> bool:
    try:
        loader.validate(data, "sample")
    except loader.ConfigError:
        return False
    return True


def test_the_config_schema_accepts_every_key_of_the_built_in_default() -> None:
    data = builtin_default().to_data()
    assert set(data) == set(_load(REPO_ROOT / manifests.CONFIG_SCHEMA)["properties"])
    assert list(_config_validator().iter_errors(data)) == []


# Values the loader accepts and values it refuses, of each key whose check the schema
# spells out as a pattern or a bound.
SAMPLES = {
    "reconcileInterval": (
        "30s",
        "500ms",
        "1m30s",
        "1.5h",
        " 2s ",
        2,
        0.5,
        "10",
        "30 seconds",
        "s",
        "",
        "1d",
        "5 s",
        True,
        [1],
    ),
    "metricsAddress": (
        ":9400",
        "0.0.0.0:9400",
        "[::]:9400",
        "node-1.local:8080",
        ":65535",
        None,
        "9400",
        "host:65536",
        "a b:1",
        ":",
        "[::]",
        9400,
    ),
    "profiles": tuple(
        [{"resource": resource, "seatsPerGroup": 1}]
        for resource in (
            "kyb.ai/gpu-1x-seat",
            "kyb.ai/gpu-2x-seat",
            "kyb.ai/gpu-4x-seat",
            "kyb.ai/gpu-3x-seat",
            "kyb.ai/gpu-8x-seat",
            "nvidia.com/gpu",
            "kyb.ai/gpu-1x-seat ",
        )
    )
    + tuple([{**PROFILE, "seatsPerGroup": n}] for n in (1, 64, 0, 65, "2", 1.5)),
    "drain": tuple([name] for name in ("G01", "a.b_c-d", "x" * 59, "-x", "x" * 60, "a/b", 1)),
    "groups": tuple([{"name": name, "gpus": [0]}] for name in ("G0", "_G0")),
    "kubeletDir": ("/var/lib/kubelet/device-plugins", "dp", "", 3),
    "unknownKey": (1,),
    "version": ("v1", "v2"),
    "logFormat": ("json", "xml"),
}


@pytest.mark.parametrize(
    ("key", "value"), [(key, value) for key, values in SAMPLES.items() for value in values]
)
def test_the_config_schema_agrees_with_the_plugin_loader(key: str, value: Any) -> None:
    data = {"profiles": [PROFILE], key: value}
    schema_accepts = not list(_config_validator().iter_errors(data))
    assert schema_accepts == _loader_accepts(data)
