"""A namespace: what separates compiled artifacts that must never mix, as a value.

Two processes may share a compiled piece only when everything that shapes the
compiled code, but is not part of the graph, is the same. Those things are a
namespace's `fields` (made from torch in `_namespace.namespace_of`); its `name`
is a digest of them, mixed into every piece's digest and naming the piece's
directory in the store. A description of the fields is recorded beside the
namespace in the store (`describe`), which the command line reads back
(`Namespace.from_description`) without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from . import _core

__all__ = ["Namespace"]

# The description's entry for Inductor's settings that differ from their defaults: shown and compared,
# but not part of the name (the fields hold Inductor's configuration as a fingerprint already).
_INDUCTOR_CHANGED = "inductor_config_changed"


@dataclasses.dataclass(frozen=True)
class Namespace:
    """The fields that make a namespace and the name they give it.

    `fields` must hold ``device`` (the device type, the name's prefix).
    `inductor_changed`: Inductor's changed settings as a description records
    them (``"name=value, ..."``); None for a namespace not read from one. Two
    namespaces are equal when their fields are.
    """

    fields: Mapping[str, str]
    inductor_changed: str | None = dataclasses.field(default=None, compare=False)
    name: str = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        fields = {str(k): str(v) for k, v in self.fields.items()}  # a copy: the name must stay true
        text = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()))
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "name", f"{fields.get('device', '')}-{_core.blake3_hex(text.encode())[:16]}")

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    @property
    def device_type(self) -> str:
        """The device type the namespace is for (``"cpu"`` for ``cpu-6e40...``)."""
        return self.name.split("-", 1)[0]

    def recorded(self) -> dict[str, str]:
        """The fields and, when known, Inductor's changed settings, by name: what a description holds."""
        recorded = dict(self.fields)
        if self.inductor_changed is not None:
            recorded[_INDUCTOR_CHANGED] = self.inductor_changed
        return dict(sorted(recorded.items()))

    def describe(self, inductor_changed: Mapping[str, str]) -> str:
        """The description recorded beside the namespace in the store: its fields and `inductor_changed`
        (Inductor's settings that differ from their defaults, by name) as JSON."""
        described = {
            **self.fields,
            _INDUCTOR_CHANGED: ", ".join(f"{k}={v}" for k, v in inductor_changed.items()),
        }
        return json.dumps(described, indent=1, sort_keys=True)

    @classmethod
    def from_description(cls, text: str) -> Namespace | None:
        """The namespace a `describe` text describes; None for a text that is not a JSON object."""
        try:
            described = json.loads(text)
        except ValueError:
            return None
        if not isinstance(described, dict):
            return None
        fields = {str(k): str(v) for k, v in described.items()}
        inductor_changed = fields.pop(_INDUCTOR_CHANGED, None)
        return cls(fields, inductor_changed)

    def diff(self, other: Namespace) -> dict[str, tuple[str | None, str | None]]:
        """The recorded fields (`recorded`) in which this namespace and `other` differ, by name in
        order: this one's value and the other's (None where one has no such field)."""
        mine, theirs = self.recorded(), other.recorded()
        names = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        return {k: (mine.get(k), theirs.get(k)) for k in names}
