"""One set of jinja2 templates, rendered into manifests or into a Helm chart's templates.

The templates under ``codegen/templates/`` never test or loop in jinja2 over deployment
data. They loop with ``{% call(pool) each(pools) %}`` and test with
``{% call when(value) %}``, and print values through the ``yaml`` and ``indent``
filters. Rendered for the manifests, the context holds Python values and these do what
a ``for``, an ``if`` and a YAML dump would. Rendered for the chart, the context holds
:class:`Go` values instead, pipelines that helm works out from ``.Values`` when it
renders, and the same helpers print ``range``, ``if``, ``toJson`` and ``toYaml``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import yaml

Caller = Callable[..., str]


@dataclass(frozen=True)
class Go:
    """A value known only when helm renders: a Go template pipeline.

    ``test`` is what ``when`` checks, where that differs from the value itself (a port
    read out of an address is there when the address is).
    """

    pipeline: str
    test: str | None = None

    def __str__(self) -> str:
        return "{{ " + self.pipeline + " }}"


@dataclass(frozen=True)
class GoYaml:
    """A Go value on its way into YAML: a scalar as JSON (which YAML reads), a block
    after ``indent``."""

    pipeline: str

    def __str__(self) -> str:
        return "{{ " + self.pipeline + " | toJson }}"


@dataclass(frozen=True)
class GoRange:
    """A list helm iterates: ``each`` binds ``element`` (Go values naming ``variable``)."""

    pipeline: str
    variable: str
    element: Any


def go_string(text: str) -> str:
    """A Go template string literal (JSON's escapes are Go's)."""
    return json.dumps(text)


def go_dict(items: Mapping[str, str | Go]) -> str:
    """A ``dict`` pipeline with the given keys; Go values are spliced in."""
    parts = [
        f"{go_string(key)} {f'({value.pipeline})' if isinstance(value, Go) else go_string(value)}"
        for key, value in items.items()
    ]
    return f"(dict {' '.join(parts)})"


def each(items: Iterable[Any] | GoRange, caller: Caller) -> str:
    if isinstance(items, GoRange):
        return (
            f"{{{{- range {items.variable} := {items.pipeline} }}}}\n"
            f"{caller(items.element)}{{{{- end }}}}\n"
        )
    return "".join(caller(item) for item in items)


def when(value: Any, caller: Caller) -> str:
    if isinstance(value, Go):
        return f"{{{{- if {value.test or value.pipeline} }}}}\n{caller()}{{{{- end }}}}\n"
    return caller() if value else ""


def to_yaml(value: Any) -> Any:
    """The ``yaml`` filter: a collection as block YAML without the final newline (for
    ``| indent(n)``), a scalar quoted only where YAML needs it."""
    if isinstance(value, Go):
        return GoYaml(value.pipeline)
    text = yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
    return text.removesuffix("\n...\n").rstrip("\n")


def indent(value: Any, width: int) -> str:
    """The ``indent`` filter: every line but the first, as jinja2's. A Go block starts
    the line it is on (``{{-`` takes the line's indentation away, ``nindent`` puts it
    back on every line)."""
    if isinstance(value, GoYaml):
        return f"{{{{- {value.pipeline} | toYaml | nindent {width} }}}}"
    return str(jinja2.filters.do_indent(str(value), width))


def environment(templates: Any) -> jinja2.Environment:
    """The jinja2 environment both renderings use; ``templates`` is a directory."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["yaml"] = to_yaml
    env.filters["indent"] = indent
    env.globals["each"] = each
    env.globals["when"] = when
    return env


class _Dumper(yaml.SafeDumper):
    """Block YAML the way people write it: nested lists indented, lists of scalars
    inline (``gpus: [0, 1]``), keys in their given order."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    inline = all(not isinstance(item, dict | list) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


_Dumper.add_representer(list, _represent_list)
