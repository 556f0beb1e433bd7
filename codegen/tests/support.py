"""Schema validation of rendered objects, shared by the manifest and the chart tests.

Kubernetes' own kinds are checked against the Kubernetes schemas that
kubernetes-validate ships, in their strict form (an unknown key is an error). Kinds from
a CRD (the PodMonitor) are checked against the CRD's openAPIV3Schema vendored in
``codegen/crds/``, made strict the same way, with ``metadata`` checked as the
Kubernetes ObjectMeta.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

from codegen import manifests

REPO_ROOT = Path(__file__).resolve().parents[2]
# The newest Kubernetes release whose schemas kubernetes-validate ships; pinned so a
# package upgrade cannot change what the tests mean without a diff here.
KUBERNETES = "1.37.0"

CRD_ROOT = REPO_ROOT / "codegen/crds"
CRDS = {("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml"}
_DEFINITIONS = f"kubernetes-json-schema/v{KUBERNETES}-local-strict/_definitions.json"
_OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class InvalidObject(ValueError):
    """A rendered object its schema refuses; the message names the key path."""


def validate(doc: dict[str, Any]) -> None:
    """Raise InvalidObject unless ``doc`` is valid for its kind, strictly."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRDS:
        error = jsonschema.exceptions.best_match(_crd_validator(*key).iter_errors(doc))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path)
            raise InvalidObject(f"{key[1]} {where or '(top level)'}: {error.message}")
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as error:
        raise InvalidObject(str(error)) from None


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load((CRD_ROOT / CRDS[(api_version, kind)]).read_text())
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"$ref": _OBJECT_META}
    definitions = json.loads(
        resources.files(kubernetes_validate).joinpath(_DEFINITIONS).read_text()
    )
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _strict(schema: Any) -> Any:
    """Refuse unknown keys wherever the schema lists the known ones, as the API server
    does under strict field validation (``kubectl apply --validate=strict``)."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for item in schema:
            _strict(item)
    return schema


def rendered_documents(repo_root: Path) -> list[dict[str, Any]]:
    """The objects `python -m codegen manifests` renders in ``repo_root``."""
    return [
        doc
        for path, content in manifests.generate(repo_root).items()
        if path.startswith(f"{manifests.OUTPUT_ROOT}/")
        for doc in yaml.safe_load_all(content)
        if doc is not None
    ]
