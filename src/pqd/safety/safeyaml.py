"""Bounded YAML loading for configs, sweep files and ``--set`` values.

:func:`load_yaml` parses with PyYAML's pure-Python ``SafeLoader`` (no object construction
beyond plain data) and a composer that counts as it builds the node graph, so hostile input
is refused before it costs memory or a stack overflow:

* ``max_bytes``: the text (or the file, checked before it is read) is no larger;
* ``max_depth``: nesting of sequences/mappings (``[[[[...]]]]`` is refused with a message,
  not a ``RecursionError``);
* ``max_nodes``: nodes of the document *with every alias expanded*, the size the data has
  once a consumer walks it (a "billion laughs" file of nested anchors is refused while it
  is being composed, after a few dozen nodes of work);
* ``max_aliases``: ``*alias`` references in the document;
* a key given twice in one mapping is refused (YAML would keep the last silently); keys
  brought in by a ``<<: *merge`` may still be overridden.

Scalars resolve as in YAML 1.1 (PyYAML's default) with one addition: floats written without
a dot, ``1e-3``, ``-2E5``, ``+3e+2``, are floats (YAML 1.1 only reads ``1.0e-3``).

:func:`grid_size_guard` refuses a sweep grid whose cartesian product is too large before
anything is expanded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode

from pqd.errors import ConfigError

__all__ = [
    "load_yaml",
    "parse_scalar",
    "grid_size_guard",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_ALIASES",
    "MAX_GRID",
]

MAX_BYTES = 1 << 20  # a config or sweep file is a few KB; 1 MiB leaves room for long grids
MAX_DEPTH = 64
MAX_NODES = 200_000
MAX_INT_DIGITS = 100  # an integer setting longer than this is a mistake (and Python's int() stops at 4,300 digits)
MAX_ALIASES = 1_000
MAX_GRID = 10_000  # runs in one sweep

_FLOAT_TAG = "tag:yaml.org,2002:float"
# PyYAML's YAML 1.1 float pattern plus dot-less exponent forms (1e-3, -2E5, 6e+2).
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Limits:
    __slots__ = ("max_depth", "max_nodes", "max_aliases", "where")

    def __init__(self, max_depth: int, max_nodes: int, max_aliases: int, where: str) -> None:
        self.max_depth, self.max_nodes, self.max_aliases, self.where = max_depth, max_nodes, max_aliases, where


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts depth, aliases and alias-expanded nodes."""

    limits: _Limits

    def __init__(self, stream: str, limits: _Limits) -> None:
        super().__init__(stream)
        self.limits = limits
        self._depth = 0
        self._count = 0
        self._aliases = 0
        self._weight: dict[int, int] = {}  # id(node) -> its size with aliases expanded

    def _grow(self, n: int) -> None:
        self._count += n
        if self._count > self.limits.max_nodes:
            raise ConfigError(
                f"{self.limits.where}: the YAML expands to more than {self.limits.max_nodes:,} values "
                "(anchors/aliases nested inside each other, a 'YAML bomb'?); refusing it. "
                "Write the values out, or split the file."
            )

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        lim = self.limits
        if self.check_event(AliasEvent):
            event = self.peek_event()
            self._aliases += 1
            if self._aliases > lim.max_aliases:
                raise ConfigError(f"{lim.where}: more than {lim.max_aliases:,} YAML aliases (*name); refusing it")
            node = self.anchors.get(event.anchor)
            if node is not None:
                self._grow(self._weight.get(id(node), 1))
            return Composer.compose_node(self, parent, index)
        if self._depth >= lim.max_depth:
            mark = self.peek_event().start_mark
            raise ConfigError(
                f"{lim.where}: YAML nested deeper than {lim.max_depth} levels (line {mark.line + 1}); refusing it"
            )
        self._depth += 1
        start = self._count
        self._grow(1)
        try:
            node = Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1
        self._weight[id(node)] = self._count - start
        return node

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 (PyYAML's signature)
        # A key given twice in one mapping is almost always a mistake (the second silently wins).
        if isinstance(node, MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, _ in node.value:
                if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    k = (key.tag, key.value)
                    if k in seen:
                        raise ConfigError(
                            f"{self.limits.where}: key {key.value!r} appears twice in one mapping "
                            f"(lines {seen[k] + 1} and {key.start_mark.line + 1}); only one may stay"
                        )
                    seen[k] = key.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):  # noqa: ANN001 (PyYAML's signature)
        # Python refuses int() of more than 4,300 digits with a bare ValueError; no pqd setting needs 100.
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise ConfigError(
                f"{self.limits.where}: an integer of {digits:,} digits at line {node.start_mark.line + 1}; pqd reads "
                f"integers of at most {MAX_INT_DIGITS} digits. Write the intended value."
            )
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)

# Own copy of the implicit resolvers with the float pattern replaced (never mutate SafeLoader's).
_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BoundedLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _read_bounded(path: Path, max_bytes: int, where: str) -> str:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ConfigError(
                f"{where}: {size:,} bytes, more than the {max_bytes:,} a pqd YAML file may hold; refusing it"
            )
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read as text: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:  # grew since stat, or a special file
        raise ConfigError(f"{where}: more than {max_bytes:,} bytes; refusing it")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where} cannot be read as text: it is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def load_yaml(
    source: str | Path,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    max_aliases: int = MAX_ALIASES,
    where: str | None = None,
) -> Any:
    """Parse one YAML document from ``source`` within the limits above.

    ``source`` is a :class:`pathlib.Path` (read with the size limit checked first) or the
    YAML text itself (a ``str``). ``where`` names the input in messages (default: the path,
    or "YAML text"). Returns plain data (dict/list/str/int/float/bool/None/date); an empty
    document gives None. Every failure is a :class:`pqd.errors.ConfigError`.
    """
    if isinstance(source, Path):
        where = where or f"{str(source)!r}"
        if not source.is_file():
            raise ConfigError(f"{where} {'is a directory' if source.is_dir() else 'does not exist'}")
        text = _read_bounded(source, max_bytes, where)
    elif isinstance(source, str):
        where = where or "YAML text"
        if len(source) > max_bytes:  # characters >= bytes/4; the UTF-8 size is what counts
            raise ConfigError(f"{where}: more than {max_bytes:,} bytes; refusing it")
        if len(source.encode("utf-8", "surrogatepass")) > max_bytes:
            raise ConfigError(f"{where}: more than {max_bytes:,} bytes; refusing it")
        text = source
    else:
        raise TypeError(f"load_yaml: expected a pathlib.Path or YAML text (str), got {type(source).__name__}")
    loader = None
    try:
        loader = _BoundedLoader(
            text, _Limits(max_depth, max_nodes, max_aliases, where)
        )  # the reader checks characters here
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as exc:  # one line: what and where, without PyYAML's source excerpt
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        detail = ", ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise ConfigError(f"{where} is not valid YAML{at}: {detail}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{where} is not valid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    except RecursionError:  # a safety net: the depth limit should have caught it
        raise ConfigError(f"{where}: YAML nested too deeply; refusing it") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_scalar(text: str, *, where: str = "--set value") -> Any:
    """A ``--set KEY=VALUE`` value: YAML with the same limits and float rule as config files."""
    return load_yaml(text, max_bytes=64 * 1024, where=where)


def grid_size_guard(grid: Mapping[str, Sequence[Any]], *, limit: int = MAX_GRID, where: str = "sweep grid") -> int:
    """The number of runs the cartesian product of ``grid`` (axis -> values) holds; a
    :class:`ConfigError` naming the axes when it exceeds ``limit``. Counts with integers, so
    nothing is allocated whatever the product."""
    sizes = {}
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ConfigError(f"{where}.{key}: expected a list of values, got {type(values).__name__}")
        sizes[key] = len(values)
    total = math.prod(sizes.values()) if sizes else 1
    if total > limit:
        axes = " x ".join(f"{k} ({n})" for k, n in sizes.items())
        raise ConfigError(
            f"{where}: {axes} = {total:,} runs, more than the limit of {limit:,}; "
            "split the sweep into several files or shorten the axes"
        )
    return total
