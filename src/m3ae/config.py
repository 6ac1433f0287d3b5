"""Typed dataclass configs ⇄ YAML, with dotted command-line overrides (`--optim.lr 1.5e-4`).

Every value is checked against the field's annotation before any work starts, and every error
names the dotted field (and the file it came from) so a bad recipe fails in the first second.
Supported annotations: bool, int, float, str, Literal[...], X | None, list[X], tuple[X, ...],
dict[str, X] and nested dataclasses. A nested dataclass with a `from_preset(name, **fields)`
classmethod and a `preset` field is built from that preset first, then the other fields apply.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import functools
import inspect
import io
import re
import reprlib
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class _BoundedRepr(reprlib.Repr):
    """Values in error messages come from files: shown cut short, never expanded whole."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 80, 80
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 8


_shown = _BoundedRepr().repr
MAX_MESSAGE = 400


def _cut(text: str) -> str:
    # a dataclass's own check may quote a whole value; one line of an error stays readable
    return text if len(text) <= MAX_MESSAGE else f"{text[:MAX_MESSAGE]}... ({len(text)} characters)"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (a few hundred bytes of `&a [*a, *a, ...]` expand to
    gigabytes wherever the tree is walked) and with duplicate keys an error, not the last one kept."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, f"alias *{event.anchor[:40]} refused: configs are plain values, write them out",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        keys = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        if len(set(keys)) != len(keys):
            repeated = next(key for key, count in collections.Counter(keys).items() if count > 1)
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_shown(repeated)}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML as every config of ours is read: safe types only, no aliases, no duplicate keys
    (`yaml.YAMLError` otherwise)."""
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml(path: str | Path) -> Any:
    """A YAML file read with `load_yaml`; every failure a ConfigError naming the file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8 at byte {error.start})") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())[:300]}") from None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Returns `value` checked against (and minimally converted to) the annotation `tp`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={_shown(value)}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={_shown(value)}: must be one of {', '.join(repr(a) for a in args)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, where)
        try:  # a scalar shorthand for the first field, e.g. a source path
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}={_shown(value)}: expected a mapping of {tp.__name__} fields ({e})") from e
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={_shown(value)}: expected a list")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}={_shown(value)}: expected {len(args)} values")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={_shown(value)}: expected a mapping")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") if args else v for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={_shown(value)}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={_shown(value)}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={_shown(value)}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={_shown(value)}: expected a string")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


@functools.cache  # every command's parser asks again, for the same few classes
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Builds the dataclass `cls` from a (possibly partial) mapping, checking every value."""
    prefix = f"{where}." if where else ""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(values) - set(fields)))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0][:80]}: unknown field of {cls.__name__} (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in values.items()}
    missing = [name for name, f in fields.items() if name not in kwargs and _default_of(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{flag_name(prefix + missing[0])}: required, not given")
    try:
        if "preset" in kwargs and kwargs["preset"] is not None and hasattr(cls, "from_preset"):
            preset = kwargs.pop("preset")
            return cls.from_preset(preset, **kwargs)
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        # The dataclass's own validation names the field; add the section it sits in.
        message = _cut(str(e))
        if where and not message.startswith(where):
            message = f"{where}: {message}"
        raise ConfigError(message) from e


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready structure of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_value(text: str) -> Any:
    """A command-line string as YAML reads it: `true` -> bool, `3` -> int, `[1, 2]` -> list, `null` -> None."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def load(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """`cls` from a YAML file (optional) with dotted overrides {"optim.lr": 1e-4} applied on top."""
    tree: dict[str, Any] = {}
    source = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
        source = f" (in {path})"
    from_file = copy.deepcopy(tree)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        return from_dict(cls, tree)
    except ConfigError as e:
        if source and overrides:
            # blame the file only for what the file says: a value typed on the command line is the
            # command line's error (the file alone is checked for the same message)
            try:
                from_dict(cls, from_file)
                source = " (on the command line)"
            except ConfigError as alone:
                source = source if str(alone) == str(e) else " (on the command line)"
        raise ConfigError(f"{e}{source}") from None


def leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """{"optim.lr": (float, its help text), ...} for every non-dataclass field, recursively."""
    out: dict[str, tuple[Any, str]] = {}
    docs = field_help(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _hints(cls)[f.name]
        if _is_dataclass_type(tp):
            out.update(leaf_fields(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (tp, docs.get(f.name, ""))
    return out


OVERRIDES_DEST = "config_overrides"


def field_help(cls: type) -> dict[str, str]:
    """{field: text} from the comment beside each field and the comment lines right above it, in the
    dataclass's source and its dataclass bases': the one place a field is documented, for code
    readers and `--help` alike."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_help(klass))
    return out


@functools.cache
def _own_field_help(cls: type) -> dict[str, str]:
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    beside, alone = {}, set()
    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0] - 1
            beside[row] = token.string.lstrip("#").strip()
            if not lines[row][: token.start[1]].strip():
                alone.add(row)
    names = set(cls.__annotations__)
    out: dict[str, str] = {}
    for number, line in enumerate(lines):
        match = re.match(r"\s+(\w+)\s*:", line)
        if not match or match.group(1) not in names or match.group(1) in out:
            continue
        above = number
        while above - 1 in alone:
            above -= 1
        text = [beside[row] for row in range(above, number)]
        if number in beside and number not in alone:
            text.append(beside[number])
        if text:
            out[match.group(1)] = " ".join(text)
    return out


def flag_name(dotted: str, cls: type | None = None) -> str:
    """The spelling `--help` lists for the field `dotted`: kebab-case words, dotted sections
    (`--optim.base-lr`), or the shared one its metadata names in `cls` (train.batch_size: `--batch-size`)."""
    listed = _field_metadata(cls).get(dotted, {}).get("flag") if cls is not None else None
    return listed or "--" + dotted.replace("_", "-")


def add_override_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One `--section.field-name VALUE` option per leaf field of `cls`, with the field's comment as help
    and its default shown; parsed values land in `args.config_overrides` as {"section.field_name": value}
    (only the ones given).

    A field is listed under one spelling. Its metadata may name another one: `flag` (the spelling a
    concept has in every command, e.g. train.batch_size is `--batch-size`; the dotted spelling is then
    a hidden alias) and `aliases` (old spellings and other tools', e.g. open_clip's `--csv-img-key`:
    accepted, not listed). The underscore spelling is always a hidden alias."""
    group = parser.add_argument_group("config fields (values are read as YAML: true, null, [0.9, 0.95], 1e-4)")
    if parser.usage is None:
        parser.usage = "%(prog)s [options] [--section.field VALUE ...]"
    values = flatten(to_dict(defaults)) if defaults is not None else _field_defaults(cls)
    metadata = _field_metadata(cls)
    for dotted, (tp, doc) in leaf_fields(cls).items():
        common = dict(metavar=_metavar(tp), dest=f"{OVERRIDES_DEST}:{dotted}", default=argparse.SUPPRESS,
                      type=parse_value)
        if _is_list(tp):
            common.update(nargs="+", action=_ListValue)
        elif tp is bool or set(get_args(tp)) == {bool, type(None)}:  # a bare `--flag` turns it on
            common.update(nargs="?", const=True)
        text = doc or dotted.rsplit(".", 1)[-1].replace("_", " ")
        shown = f"default: {_yaml_scalar(values[dotted])}" if dotted in values else "required"
        own = metadata.get(dotted, {})
        listed = own.get("flag")
        if listed is None or listed in parser._option_string_actions:  # a second nested copy keeps its dotted flag
            listed = flag_name(dotted)
        group.add_argument(listed, help=f"{text} ({shown})".replace("%", "%%"), **common)
        hidden = [flag_name(dotted), f"--{dotted}", *own.get("aliases", ())]
        for flag in dict.fromkeys(hidden):
            if flag not in parser._option_string_actions:
                group.add_argument(flag, help=argparse.SUPPRESS, **common)


def _field_metadata(cls: type, prefix: str = "") -> dict[str, Any]:
    """{"train.batch_size": {"flag": "--batch-size"}, ...}: the metadata of every leaf field that has
    some, wherever its dataclass is nested, so every command that embeds it gets the same spellings."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_dataclass_type(tp):
            out.update(_field_metadata(tp, f"{prefix}{f.name}."))
        elif f.init and f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata
    return out


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _metavar(tp: Any) -> str:
    if get_origin(tp) is list:  # one word per value given
        return _metavar(get_args(tp)[0]) if get_args(tp) else "VALUE"
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join(_metavar(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp)).upper()


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _field_defaults(cls: type) -> dict[str, Any]:
    """{"section.field": default} of the fields that have one (a required field has none to show)."""
    values = {f.name: _default_of(f) for f in dataclasses.fields(cls) if f.init}
    return flatten(to_dict({name: value for name, value in values.items() if value is not dataclasses.MISSING}))


def _is_list(tp: Any) -> bool:
    return any(get_origin(option) is list for option in (tp, *get_args(tp)))


class _ListValue(argparse.Action):
    """A list field takes several values (`--images a.png b.png`), repeats of the flag, or one YAML list
    (`--data.image-only-sources "[{source: x.tar}]"`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values:
            items.extend(value if isinstance(value, list) else [value])
        setattr(namespace, self.dest, items)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"section.field": value} of a nested mapping (the inverse of `_set_dotted`)."""
    out: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key.split(":", 1)[1]: value for key, value in vars(args).items() if key.startswith(f"{OVERRIDES_DEST}:")
    }


def to_yaml(obj: Any) -> str:
    """The YAML that `load` reads back into the same config (`--print-config` and config.yaml)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def save_yaml(obj: Any, path: str | Path) -> None:
    """Writes the resolved config (temp file, then rename: never a half-written recipe)."""
    from .utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(to_yaml(obj))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, config_help: str | None = None) -> None:
    """The grammar of a command configured by the dataclass `cls`: `--config FILE`, `--print-config`
    and one flag per field (`add_override_arguments`); `command_config` reads them back."""
    parser.add_argument("--config", help=config_help or "YAML file of config fields (as --print-config writes); "
                        "flags apply on top")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (readable by --config) and exit")
    add_override_arguments(parser, cls)


def command_config(args: argparse.Namespace, cls: type[T]) -> T | None:
    """The command's config (--config, then the flags given); None once --print-config has printed it."""
    cfg = load(cls, args.config, collect_overrides(args))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg
