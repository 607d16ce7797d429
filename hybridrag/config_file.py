"""Config dataclasses from a dict or a JSON/YAML file, and the field checks they share (standard library only, so
every layer's config can use it: system, train, encoders, diffusion).

    class MyConfig(ConfigFile): ...          # a @dataclass
    MyConfig.from_any(None | MyConfig | dict | "config.json" | "config.yaml")

Unknown keys are refused, never ignored; every error names the field, what it must be and what it got.
"""
import dataclasses
import json
from pathlib import Path

from ._optional import import_optional


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(where, value, minimum, *, allow=()):
    """`value` if it is an int >= minimum or one of `allow` (e.g. -1, None); ValueError naming `where` otherwise."""
    if value in allow and (value is None or _is_int(value)):
        return value
    if not _is_int(value) or value < minimum:
        also = "".join(f" or {item}" for item in allow)
        raise ValueError(f"{where} must be an int >= {minimum}{also}, got {value!r}")
    return value


def _check_choice(where, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_bool(where, value):
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be True or False, got {value!r}")
    return value


def _check_optional_path(where, value):
    """None, or a str/Path kept as str (so to_dict stays JSON)."""
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"{where} must be None or a path (str), got {value!r}")
    return str(value)


class ConfigFile:
    """from_any for a config dataclass: None, the config itself, a dict, or a path to a JSON or YAML file."""

    @classmethod
    def from_any(cls, value):
        """None -> defaults; an instance -> itself; a dict; or a path to a .json, .yaml or .yml file."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return _build(cls, value, "config")
        if isinstance(value, (str, Path)):
            return _build(cls, _read_file(Path(value)), str(value))
        raise TypeError(f"config must be None, a {cls.__name__}, a dict or a path to a JSON/YAML file, "
                        f"got {type(value).__name__}")

    def to_dict(self):
        """Plain JSON-serialisable dict that from_any reads back equal (a config with non-JSON fields overrides it)."""
        return dataclasses.asdict(self)


def _build(kind, values, where):
    """kind(**values), refusing keys that are not fields of `kind` (listing them and the known ones)."""
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be a dict (a mapping of field names), got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys of {kind.__name__}: {known}")
    return kind(**values)


def _read_file(path):
    """The mapping in a .json/.yaml/.yml file (an empty YAML file is {}); errors name the file."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    else:
        yaml = import_optional("yaml", "pyyaml", "system")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path}: not valid YAML ({error})") from None
        values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names, got {type(values).__name__}")
    return values
