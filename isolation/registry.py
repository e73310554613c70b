"""Backend names -> classes, imported lazily so a missing optional dependency of one
backend (e.g. the docker SDK) never breaks the others."""

from __future__ import annotations

import importlib

from .base import Backend

# name -> "module of this package:class"
BACKENDS: dict[str, str] = {
    "process": "process:ProcessBackend",
    "nsjail": "nsjail:NsjailBackend",
    "docker": "docker:DockerBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name`` (imports its module). ValueError if unknown."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), cls)


def get_backend(name: str, **options: object) -> Backend:
    """A ready backend instance: ``get_backend("nsjail", uid=65534)``.

    Options are the backend class's keyword arguments. Unknown name -> ValueError
    naming the known ones; an import failure (backend not installed) propagates.
    """
    return backend_class(name)(**options)
