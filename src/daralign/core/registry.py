"""The one registry pattern the plug-in rooms share: a name → class table and its decorator
(objectives, annotators, judge backends, rollout engines; docs/architecture.md)."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], attribute: str = "name") -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: ``@register("x")`` puts the class in ``table`` under "x" and sets its
    ``attribute`` to "x"."""

    def register(name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            table[name] = cls
            setattr(cls, attribute, name)
            return cls

        return wrap

    return register
