"""Worker group profiles: the model every group config is checked against, and the
profiles shipped with sandmill (``default``, ``native``, ``gpu``, ``highmem``)."""

from importlib import resources
from pathlib import Path

from .model import Autoscaling, BackendConfig, Profile, ProfileError, load_profile, profile_from_dict


def shipped(name: str) -> Path:
    """The path of a shipped profile, e.g. ``shipped("default")``."""
    return Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))


__all__ = ["Autoscaling", "BackendConfig", "Profile", "ProfileError", "load_profile",
           "profile_from_dict", "shipped"]
