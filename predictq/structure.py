"""How a model's inputs and outputs are arranged: one array, a list, or a dict by name.

``flatten`` takes such a value apart into its layout and its leaves (the
arrays, in order); ``unflatten`` puts leaves back into a layout. Producer and
worker both use the pair, so every structured value crosses one definition of
the three shapes: a job's input on either side, the model's call and outputs,
and the result the producer hands back.

A mapping with the ``__ndarray__`` key is one array in its wire form (see
predictq/codec.py), not a dict of inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from predictq.codec import NDARRAY_KEY

T = TypeVar("T")

Structure = Literal["single", "list", "dict"]


@dataclass(frozen=True)
class Layout:
    """Where each leaf sits: its dict key, or its list index; a single value has no key."""

    structure: Structure
    keys: tuple[Any, ...] = ()

    @classmethod
    def of(cls, structure: Structure, names: Sequence[str]) -> Layout:
        """The layout of a model's inputs or outputs, from their structure and names."""
        if structure == "dict":
            return cls("dict", tuple(names))
        if structure == "list":
            return cls("list", tuple(range(len(names))))
        return SINGLE


SINGLE = Layout("single")


def flatten(value: object, *, order: Sequence[str] | None = None) -> tuple[Layout, list[Any]]:
    """``value``'s layout and leaves: a dict's values, a list's (or tuple's) items, or itself.

    ``order``: the keys to take a dict's values by (default: the dict's own order);
    a key missing from the dict raises ``KeyError``.
    """
    if isinstance(value, Mapping) and NDARRAY_KEY not in value:
        keys = tuple(value) if order is None else tuple(order)
        return Layout("dict", keys), [value[k] for k in keys]
    if isinstance(value, list | tuple):
        return Layout("list", tuple(range(len(value)))), list(value)
    return SINGLE, [value]


def unflatten(layout: Layout, leaves: Sequence[T]) -> T | list[T] | dict[Any, T]:
    """``leaves`` put back into ``layout``: the inverse of ``flatten``."""
    if layout.structure == "dict":
        return dict(zip(layout.keys, leaves, strict=True))
    if layout.structure == "list":
        return list(leaves)
    (leaf,) = leaves
    return leaf
