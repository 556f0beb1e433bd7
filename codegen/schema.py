"""JSON Schemas from the pydantic models: the plugin config's, and the chart values'.

``config_schema`` describes a plugin ``config.yaml`` for editors
(``manifests/config.schema.json``); ``values_schema`` describes a deployment, which is
what the chart's values are (``values.schema.json``, checked by helm before it renders).
Both come from ``model_json_schema``. What pydantic cannot see is added here: the
fields whose checks are functions (a resource name, a group name, a duration, an
address) get the pattern those functions enforce, and a pool's config gets the rules
the manifest generator adds on top of the plugin's (a metrics address the pod can be
scraped on, absolute host paths). The checks that need the topology or several fields
at once stay in the plugin's loader and in the generator.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import BeforeValidator
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from pkg.deviceplugin.config import model
from pkg.deviceplugin.types import RESOURCE_PATTERN

DIALECT = "https://json-schema.org/draft/2020-12/schema"

_NUMBER = r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?"
DURATION_PATTERN = rf"^\s*({_NUMBER}|({_NUMBER}(ms|h|m|s))+)\s*$"
_PORT = r"0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
HOST_PORT_PATTERN = rf"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*):{_PORT}$"
# A GPU UUID in drainGpus: no blank, not all digits (an index is written as a number).
GPU_UUID_PATTERN = r"^\S*[^0-9\s]\S*$"
# A host path mounted into the pod: absolute, no empty part, no trailing slash.
HOST_PATH_PATTERN = r"^(/[^/]+)+$"
HOST_PATH_KEYS = ("kubeletDir", "podResourcesSocket", "stateDir")


class _Generator(GenerateJsonSchema):
    """Titles only for models: "Seatspergroup" helps nobody in an editor's tooltip."""

    def field_title_should_be_set(self, schema: core_schema.CoreSchema) -> bool:
        return False


def portable(pattern: str) -> str:
    """A Python regular expression as JSON Schema's (ECMA 262) and Go's read it alike."""
    return re.sub(r"\(\?P<\w+>", "(", pattern)


def config_schema() -> dict[str, Any]:
    """The plugin's config.yaml."""
    schema = model.Config.model_json_schema(by_alias=True, schema_generator=_Generator)
    properties = schema["properties"]
    definitions = schema["$defs"]
    group_name = {"type": "string", "pattern": portable(model.GROUP_NAME_PATTERN.pattern)}
    definitions["Profile"]["properties"]["resource"] = {
        "type": "string",
        "pattern": portable(RESOURCE_PATTERN.pattern),
        "description": "kyb.ai/gpu-<1|2|4>x-seat: the GPUs per group are in the name.",
    }
    definitions["GroupSpec"]["properties"]["name"] = group_name
    properties["drain"]["items"] = group_name
    gpu_ref = {
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": GPU_UUID_PATTERN},
        ]
    }
    properties["drainGpus"]["items"] = gpu_ref
    override = definitions["NodeOverride"]["properties"]
    override["drain"]["anyOf"][0]["items"] = group_name
    override["drainGpus"]["anyOf"][0]["items"] = gpu_ref
    override["seatsPerGroup"]["anyOf"][0]["propertyNames"] = {
        "pattern": portable(RESOURCE_PATTERN.pattern)
    }
    for name, field in model.Config.model_fields.items():
        key = field.alias or name
        if any(
            isinstance(m, BeforeValidator) and m.func is model.parse_duration
            for m in field.metadata
        ):
            properties[key] = {
                "anyOf": [
                    {"type": "number", "exclusiveMinimum": 0},
                    {"type": "string", "pattern": DURATION_PATTERN},
                ],
                "default": model.format_duration(field.default),
                "description": properties[key]["description"],
            }
    for key in HOST_PATH_KEYS:
        properties[key].pop("format")
        properties[key]["minLength"] = 1
    properties["metricsAddress"]["anyOf"] = [
        {"type": "string", "pattern": HOST_PORT_PATTERN},
        {"type": "null"},
    ]
    return {"$schema": DIALECT, **_closed(schema)}


def values_schema() -> dict[str, Any]:
    """A deployment (``codegen/deployment.yaml``), which is what the chart's values are."""
    # Imported here: the manifests module renders config.schema.json with this one.
    from codegen import manifests

    schema = manifests.Deployment.model_json_schema(by_alias=True, schema_generator=_Generator)
    config = config_schema()
    definitions = schema["$defs"]
    clashes = definitions.keys() & config["$defs"].keys()
    assert not clashes, f"definitions of the config and the deployment share names: {clashes}"
    definitions.update(config.pop("$defs"))
    pool_config = copy.deepcopy({k: v for k, v in config.items() if k != "$schema"})
    for key in HOST_PATH_KEYS:
        pool_config["properties"][key]["pattern"] = HOST_PATH_PATTERN
    address = pool_config["properties"]["metricsAddress"]["anyOf"][0]
    address["allOf"] = [{"pattern": manifests.METRICS_ADDRESS_IN_POD}]
    address["description"] = (
        ":PORT, 0.0.0.0:PORT or [::]:PORT: the pod's own address is unknown when rendering"
    )
    pool_config["title"] = "PoolConfig"
    definitions["PoolConfig"] = pool_config
    pool = definitions["Pool"]["properties"]
    pool["config"] = {"$ref": "#/$defs/PoolConfig", "description": pool["config"]["description"]}
    # Helm drops a key whose value is null when it merges values; a pool without
    # podMonitor is written without the key.
    pool["podMonitor"] = {
        "$ref": "#/$defs/PodMonitor",
        "description": pool["podMonitor"]["description"],
    }
    # The labels the generator sets itself (they select the pool's pods) are refused.
    taken = sorted(manifests.component_labels(manifests.pool_selector(""), ""))
    definitions["PodMonitor"]["properties"]["labels"]["properties"] = dict.fromkeys(taken, False)
    quantity = definitions["Quantities"]["properties"]
    for key in quantity:
        quantity[key] = {
            "anyOf": [
                {"type": "string", "pattern": manifests.QUANTITY_PATTERN},
                {"type": "integer", "minimum": 0},
            ]
        }
    # An empty namespace: the release's (helm install --namespace), with no Namespace object.
    namespace = schema["properties"]["namespace"]
    namespace["pattern"] = namespace["pattern"].replace("^", "^(", 1).replace("$", ")?$")
    namespace["description"] = (
        "The namespace of every namespaced object, created with the Pod Security label "
        "the plugin needs; empty: the release's namespace, which must already allow "
        "privileged pods"
    )
    return {"$schema": DIALECT, **_closed(schema)}


def _closed(schema: Any) -> Any:
    """A mapping whose keys pydantic checks by pattern (``dict[LabelKey, ...]``) refuses
    the keys no pattern matches, as the model does."""
    if isinstance(schema, dict):
        if "patternProperties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for item in schema:
            _closed(item)
    return schema
