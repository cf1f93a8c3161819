"""Building blocks of configuration structs, shared by every package that is configured.

Each package keeps the msgspec Structs for its own settings beside its code (`reexec/cas/config.py`,
`reexec/sched/config.py`, `reexec/sandbox/config.py`); the daemon only composes them into one
file format and hands each part over. Structs are strict (unknown keys are errors) so a typo in
a config file is reported, not ignored.
"""

from __future__ import annotations

import re
from typing import Union

import msgspec

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_UNITS |= {"KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}

ByteSize = Union[int, str]  # noqa: UP007 - msgspec needs a runtime Union here


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "512MiB", "10GB", "4096"."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(
            f"size {value!r} is not a number of bytes like 1048576, '512MiB' or '10GB'"
        )
    unit = (m.group(2) or "").upper().rstrip("B")
    return int(float(m.group(1)) * _UNITS[unit])


class ConfigStruct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A config section: unknown keys are errors, every field is keyword-only."""


class TaggedConfigStruct(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    """A config section chosen by its `type` key (one member of a tagged union)."""
