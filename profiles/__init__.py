"""Worker group profiles: the model every group config is checked against, and the
profiles shipped with sandmill (``default``, ``native``, ``gpu``, ``highmem``)."""

from importlib import resources
from pathlib import Path

from .model import (AutoBackend, BackendConfig, DockerBackend, NsjailBackend, ProcessBackend, Profile,
                    ProfileError, load_profile, profile_from_dict)


def shipped(name: str) -> Path:
    """The path of a shipped profile, e.g. ``shipped("default")``."""
    return Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))


def shipped_names() -> list[str]:
    """The names of the shipped profiles, sorted."""
    return sorted(f.name[:-5] for f in resources.files(__name__).iterdir() if f.name.endswith(".yaml"))


def resolve(ref: str) -> Path:
    """A profile given as a file path, or as the name of a shipped profile (``native``)."""
    if "/" not in ref and not ref.endswith((".yaml", ".yml")) and ref in shipped_names():
        return shipped(ref)
    return Path(ref)


__all__ = ["AutoBackend", "BackendConfig", "DockerBackend", "NsjailBackend", "ProcessBackend", "Profile",
           "ProfileError", "load_profile", "profile_from_dict", "resolve", "shipped", "shipped_names"]
