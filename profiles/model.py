"""Worker group profiles, read by workers and checked by the server's config API: one
pydantic model, loaded from YAML, refused early with the file, the field and the reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sandmill.isolation import Limits

_TAG_RE = re.compile(r"^[A-Za-z0-9_.\-$\[\]]+(\([A-Za-z0-9_\-+]+\))?$")


class BackendConfig(BaseModel):
    """Which isolation backend runs the group's jobs, and its options (passed through to
    the backend's constructor, e.g. ``image`` for docker)."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["nsjail", "docker", "process", "auto"] = "auto"
    # When the kind cannot run on this host: fall back to process (with a warning) or refuse.
    fallback: Literal["process", "refuse"] = "process"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Profile(BaseModel):
    """A worker group: what it serves (tags), how it runs jobs (backend, limits), and its
    lifecycle scripts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    tags: list[str] = Field(min_length=1)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    subworkers: int = Field(1, ge=1, le=256)
    native: bool = False  # run native jobs (postgresql, http) in-process
    # a busy subworker claims its next job while the current one runs, from a backlog only
    # (see WorkerSettings.claim_ahead_*): the claim's round trip is off the job's path
    claim_ahead: bool = True
    limits: Limits = Field(default_factory=Limits)
    python: str = "/usr/bin/python3"
    bash: str = "/bin/bash"
    env_allow: list[str] = Field(default_factory=list)  # worker env vars a job may see, by name
    env: dict[str, str] = Field(default_factory=dict)   # static env given to every job
    init_script: str | None = None                      # bash, run once before the first job
    periodic_script: str | None = None                  # bash, run every periodic_interval_s
    periodic_interval_s: int = Field(3600, ge=1)
    requires_gpu: bool = False

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        for t in tags:
            if not _TAG_RE.match(t):
                raise ValueError(f"bad tag {t!r}: letters, digits, _ - . and an optional (ws1+ws2)")
        if len(set(tags)) != len(tags):
            raise ValueError("tags must not repeat")
        return tags

    @field_validator("env_allow")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n):
                raise ValueError(f"bad environment variable name {n!r}")
        return names


class ProfileError(Exception):
    """A profile that cannot be used; the message names the file, the field and the reason."""


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such file") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{p}: a profile is a mapping of fields, got {type(raw).__name__}")
    return profile_from_dict(raw, source=str(p))


def profile_from_dict(raw: dict[str, Any], source: str = "<config>") -> Profile:
    try:
        return Profile.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"{source}: field '{field}': {err['msg']}")
        raise ProfileError("\n".join(lines)) from None
