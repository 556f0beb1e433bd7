"""YAML from operators (the config, a mock topology file) at a bounded cost.

PyYAML resolves an alias to the anchored object itself, so a 1 KB file with nine levels
of aliases loads quickly into a structure that expands to billions of nodes the moment
anything walks it (validation, hashing, printing), and a few thousand nested brackets
exhaust the composer's recursion. Both are refused before the document is composed:
one pass over the parser's events (iterative, linear in the file) measures the
document's depth and its size with every alias expanded.

Every refusal and every syntax error is one line naming the file, with line and column
where PyYAML gives a position (its reader errors otherwise add a second line).
"""

from __future__ import annotations

from typing import Any

import yaml

# A real config or topology file is a few kilobytes and a few hundred nodes.
MAX_BYTES = 256 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000  # with every alias expanded


# libyaml's parser where PyYAML was built with it: the pure-Python scanner takes about
# 0.3 s over 5000 unclosed brackets before the depth bound can refuse them.
_EVENTS_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlError(ValueError):
    """YAML that is refused: invalid, or too costly. ``where`` is ``file[:line:col]``,
    ``problem`` the one-line reason."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def load(text: str, source: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """The document in ``text``, checked against the bounds first."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise YamlError(source, f"file is {size} bytes, more than the {MAX_BYTES} allowed")
    try:
        _check_cost(text, source)
        return yaml.load(text, Loader=loader)
    except YamlError:
        raise
    except yaml.MarkedYAMLError as error:
        raise YamlError(_where(source, error.problem_mark), _problem(error)) from None
    except yaml.reader.ReaderError as error:
        line, column = _line_column(text, error.position)
        if isinstance(error.character, int):
            reason = f"unacceptable character #x{error.character:04x}"
        else:
            reason = error.reason
        raise YamlError(f"{source}:{line}:{column}", f"invalid YAML: {reason}") from None
    except yaml.YAMLError as error:
        raise YamlError(source, "invalid YAML: " + " ".join(str(error).split())) from None
    except RecursionError:  # a safety net: the depth bound comes first
        raise YamlError(source, f"nested more than {MAX_DEPTH} levels deep") from None


def _check_cost(text: str, source: str) -> None:
    """Depth and expanded size from the event stream, before anything is composed."""
    anchored: dict[str, int] = {}
    # One open collection per level: [nodes so far, its anchor].
    stack: list[list[Any]] = [[0, None]]
    total = 0
    for event in yaml.parse(text, Loader=_EVENTS_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) > MAX_DEPTH:
                raise YamlError(
                    _where(source, event.start_mark), f"nested more than {MAX_DEPTH} levels deep"
                )
            stack.append([1, event.anchor])
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            size, anchor = stack.pop()
            if anchor is not None:
                anchored[anchor] = size
            stack[-1][0] += size
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchored[event.anchor] = 1
            stack[-1][0] += 1
        elif isinstance(event, yaml.AliasEvent):
            if any(level[1] == event.anchor for level in stack):
                raise YamlError(
                    _where(source, event.start_mark),
                    f"alias *{event.anchor} refers to a node that contains it",
                )
            stack[-1][0] += anchored.get(event.anchor or "", 1)
        else:
            continue
        total = stack[0][0] + sum(level[0] for level in stack[1:])
        if total > MAX_NODES:
            raise YamlError(
                _where(source, event.start_mark),
                f"more than {MAX_NODES} nodes with its aliases expanded (an alias bomb?)",
            )


def _where(source: str, mark: Any) -> str:
    """``file:line:col`` from a PyYAML or libyaml mark (both have ``line``, ``column``)."""
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source


def _problem(error: yaml.MarkedYAMLError) -> str:
    return "invalid YAML: " + " ".join((error.problem or error.context or "syntax error").split())


def _line_column(text: str, position: int) -> tuple[int, int]:
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1
