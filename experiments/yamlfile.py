"""The one YAML reader: every YAML nmtrain reads (a spec, an override's value, a run's config.yaml).

`load_yaml` reads text as plain data after bounding it: at most `MAX_YAML_BYTES`, no key twice in a
mapping, and at most `MAX_YAML_VALUES` values and `MAX_YAML_DEPTH` levels counted as if every alias were
expanded (a "billion laughs" is refused, not built). `read_yaml` reads one regular UTF-8 text file of
bounded size through it and wants a mapping. Knowing nothing of what a spec holds, it sits below
`spec.py`; its errors are `SpecError` (defined in `errors.py`, so both can raise it).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError


# A spec is a few KiB with a few hundred values, nested four or five levels; these bounds are far above
# any real one and far below what hangs. PyYAML builds an aliased value once, but deepcopy and safe_dump
# (of a run's config.yaml) expand it, so nine levels of nine aliases ("billion laughs") are 9**9 values.
# PyYAML's pure-Python scanner reads some 1 MiB in 4 s, hence the small file size.
MAX_YAML_BYTES = 256 << 10
MAX_YAML_VALUES = 10_000        # counted as if every alias were expanded
MAX_YAML_DEPTH = 32             # levels of nesting, aliases expanded (a self-referencing alias is endless)


def _too_long(source: str) -> SpecError:
    return SpecError(f"{source}: over {MAX_YAML_BYTES >> 10} KiB; a spec is a few KiB")


def _too_big(source: str) -> SpecError:
    return SpecError(f"{source}: more than {MAX_YAML_VALUES:,} values once its aliases (*name) are expanded; "
                     "a spec holds far fewer (an alias bomb?)")


def _too_deep(source: str) -> SpecError:
    return SpecError(f"{source}: nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)")


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that bounds the nodes it composes and their nesting while it composes: PyYAML's
    composer recurses, so a few KB of ``[[[[...`` would end in a RecursionError before any later check."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source, self.depth, self.composed = source, 0, 0

    def compose_node(self, parent, index):
        self.depth += 1
        self.composed += 1          # an alias counts once here; `_check_tree` counts it expanded
        if self.depth > MAX_YAML_DEPTH:
            raise _too_deep(self.source)
        if self.composed > MAX_YAML_VALUES:
            raise _too_big(self.source)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _children(node: yaml.Node, path: str, source: str) -> list[tuple[yaml.Node, str]]:
    """A node's children with their dotted paths; a key given twice in a mapping is an error (PyYAML
    keeps the last silently). Keys merged in by ``<<: *base`` may be overridden, as YAML means them to."""
    if isinstance(node, yaml.SequenceNode):
        return [(child, f"{path}[{i}]") for i, child in enumerate(node.value)]
    if not isinstance(node, yaml.MappingNode):
        return []
    children, first_line = [], {}
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            children.append((value, path))
            continue
        name = key.value if isinstance(key, yaml.ScalarNode) else "?"
        where = f"{path}.{name}" if path else name
        if isinstance(key, yaml.ScalarNode):
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_line:
                raise SpecError(f"{source}: key '{where}' appears twice (lines {first_line[key.tag, key.value]} "
                                f"and {line}); keep one")
            first_line[key.tag, key.value] = line
        children += [(key, where), (value, where)]
    return children


def _check_tree(root: yaml.Node, source: str) -> None:
    """Refuse a composed document too big or too deep once its aliases are expanded, or that repeats a
    key. Each node's expanded size is memoised, so a billion laughs costs a visit per node, not 9**9."""
    memo: dict[int, tuple[int, int]] = {}       # id(node) -> (values, levels), aliases expanded

    def visit(node: yaml.Node, depth: int, path: str) -> tuple[int, int]:
        if id(node) not in memo:
            if depth > MAX_YAML_DEPTH:          # also ends a self-referencing alias, never memoised
                raise _too_deep(source)
            size, height = 1, 1
            for child, where in _children(node, path, source):
                child_size, child_height = visit(child, depth + 1, where)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_YAML_VALUES:
                    raise _too_big(source)
            memo[id(node)] = size, height
        size, height = memo[id(node)]
        if depth + height - 1 > MAX_YAML_DEPTH:
            raise _too_deep(source)
        return size, height

    visit(root, 1, "")


def load_yaml(text: str, source: str) -> Any:
    """The one YAML reader: ``text`` as plain data, after the checks above. ``source`` starts each
    message (``SPEC: f.yaml``). Errors of ours are SpecError; a syntax error stays a yaml.YAMLError."""
    if len(text) > MAX_YAML_BYTES:
        raise _too_long(source)
    try:
        loader = _BoundedLoader(text, source)
    except yaml.reader.ReaderError as exc:      # control characters: binary data that happens to be UTF-8
        raise SpecError(f"{source} is not a text YAML file (character #x{exc.character:04x} at "
                        f"position {exc.position})") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_text(path: Path, source: str) -> str:
    """A regular file's UTF-8 text. The kind is checked before opening: reading a FIFO would block until
    something writes to it, a directory or a device is not a spec either."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SpecError(f"{source} does not exist") from None
    except OSError as exc:
        raise SpecError(f"{source} cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise SpecError(f"{source} is a directory; give a YAML file")
    if not stat.S_ISREG(mode):
        raise SpecError(f"{source} is not a regular file (a pipe or a device?); give a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{source} cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise _too_long(source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{source} is not a text YAML file (not UTF-8 at byte {exc.start})") from None


def read_yaml(path: str | Path, field: str = "SPEC") -> dict:
    """A YAML file holding a mapping (a spec, a run's config.yaml); ``field`` names it in messages."""
    path = Path(path)
    source = f"{field}: {path}"
    try:
        data = load_yaml(_read_text(path, source), source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{source} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{source} must hold a mapping of spec sections, got {type(data).__name__}")
    return data
