"""``field(default, help)``: a dataclass field that carries its meaning for ``--help``.

Library configs (:class:`perk.config.PerkConfig`, :class:`perk.runs.TrainConfig`) declare their
fields with it; :mod:`perk.cli` reads ``metadata["help"]`` to list every key with its default.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text for ``--help`` (mutable and dataclass defaults copied)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
