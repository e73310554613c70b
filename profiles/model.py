"""Worker group profiles, read by workers and checked by the server's config API: one
pydantic model, loaded from YAML, refused early with the file, the field and the reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandmill.isolation import Limits
from sandmill.isolation.options import SHARED_NSJAIL_PROCESS, DockerOptions, NsjailOptions, ProcessOptions

from .autoscaling import Autoscaling

# a script a dedicated group serves: "<workspace>:<path>" (Windmill's form)
DEDICATED_RE = r"^[A-Za-z0-9_\-]+:[A-Za-z0-9_\-./]+$"
_TAG_RE = re.compile(r"^[A-Za-z0-9_.\-$\[\]]+(\([A-Za-z0-9_\-+]+\))?$")


class _Backend:
    """A profile's ``backend`` (mixed into each kind's model): the kind, and that backend's
    constructor options."""

    @property
    def options(self) -> dict[str, Any]:
        """The backend constructor's keyword arguments (for ``auto``: nsjail's)."""
        return self.model_dump(exclude={"kind"})


class NsjailBackend(NsjailOptions, _Backend):
    """``kind: nsjail``: jobs run in nsjail, or the worker does not start."""

    kind: Literal["nsjail"]


class ProcessBackend(ProcessOptions, _Backend):
    """``kind: process``: jobs run as plain processes (rlimits, cgroups, namespaces as root)."""

    kind: Literal["process"]


class DockerBackend(DockerOptions, _Backend):
    """``kind: docker``: a container per job through dockerd, or the worker does not start."""

    kind: Literal["docker"]


class AutoBackend(NsjailOptions, _Backend):
    """``kind: auto``: nsjail where its probe says it works, else process. Takes nsjail's
    options; when process is chosen it gets the ones the two share (``process_options``)."""

    kind: Literal["auto"] = "auto"

    def process_options(self) -> dict[str, Any]:
        """What process takes of these options: nsjail's ``binary`` and ``lo_up`` do not apply."""
        return {k: v for k, v in self.options.items() if k in SHARED_NSJAIL_PROCESS}


BackendConfig = Annotated[Union[NsjailBackend, ProcessBackend, DockerBackend, AutoBackend],
                          Field(discriminator="kind")]

NO_FALLBACK = ("'fallback' is gone: an explicit kind (nsjail, docker, process) never falls back"
               " to a weaker backend, the worker refuses to start where it cannot run; to let the"
               " worker choose (nsjail where it works, else process) use kind: auto")


def _backend_input(v: Any) -> Any:
    """``kind`` defaults to ``auto``; the removed ``fallback`` gets an error that says why."""
    if isinstance(v, dict):
        if "fallback" in v:
            raise ValueError(NO_FALLBACK)
        if "kind" not in v:
            return {**v, "kind": "auto"}
    return v


class Profile(BaseModel):
    """A worker group: what it serves (tags), how it runs jobs (backend, limits), and its
    lifecycle scripts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    # at least one, unless the group is dedicated to scripts (then none: _dedicated)
    tags: list[str] = Field(default_factory=list)
    backend: BackendConfig = Field(default_factory=AutoBackend)
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
    # dedicated workers (worker/dedicated.py): "<workspace>:<script path>", or several
    dedicated_worker: str | None = Field(None, pattern=DEDICATED_RE)
    dedicated_workers: list[str] = Field(default_factory=list)
    # GPUs handed to each running job, its own (worker/gpus.py); unset: the group's jobs get none
    gpus_per_job: int | None = Field(None, strict=True)
    gpu_sharing: bool = False  # a GPU may serve several jobs at once (least busy first)
    autoscaling: Autoscaling | None = None  # server/autoscale: grow with the queue, shrink to min_workers

    @property
    def dedicated(self) -> list[str]:
        """The scripts ("<workspace>:<path>") this group is dedicated to; [] for none."""
        return ([self.dedicated_worker] if self.dedicated_worker else []) + [
            s for s in self.dedicated_workers if s != self.dedicated_worker]

    @model_validator(mode="after")
    def _dedicated(self) -> "Profile":
        if not self.dedicated:
            if not self.tags:
                raise ValueError("tags: a group needs at least one tag (a group dedicated to"
                                 " scripts, with dedicated_worker(s), needs none)")
            return self
        why = dedicated_refusal(self)
        if why:
            raise ValueError(why)
        return self

    @field_validator("dedicated_workers")
    @classmethod
    def _dedicated_names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not re.match(DEDICATED_RE, n):
                raise ValueError(f"bad script {n!r}: dedicated workers name scripts as"
                                 " '<workspace>:<script path>'")
        return names

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, v: Any) -> Any:
        return _backend_input(v)

    @field_validator("gpus_per_job")
    @classmethod
    def _gpus_per_job(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 16:
            raise ValueError(f"gpus_per_job must be 1 to 16 (leave it unset for jobs without a GPU), got {v}")
        return v

    @field_validator("gpu_sharing")
    @classmethod
    def _gpu_sharing(cls, v: bool, info: Any) -> bool:
        if v and info.data.get("gpus_per_job") is None:
            raise ValueError("gpu_sharing needs gpus_per_job: a group whose jobs get no GPU has none to share")
        return v

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


def _known_options(err: Any) -> str:
    """For an unknown backend option (loc backend.<kind>.<name>): the options that kind takes."""
    loc = err["loc"]
    if err["type"] != "extra_forbidden" or len(loc) != 3 or loc[0] != "backend":
        return ""
    model = {"nsjail": NsjailBackend, "process": ProcessBackend, "docker": DockerBackend,
             "auto": AutoBackend}.get(str(loc[1]))
    if model is None:
        return ""
    return f" (backend {loc[1]} takes: {', '.join(sorted(n for n in model.model_fields if n != 'kind'))})"


def dedicated_refusal(p: "Profile") -> str | None:
    """Why a group cannot be dedicated to scripts as configured, or None. A dedicated
    runtime is a long-lived warm interpreter inside the group's sandbox: a backend without
    warm interpreters cannot host one, and is refused rather than run weaker."""
    if p.tags:
        return (f"tags: a group dedicated to scripts serves only them; leave tags out"
                f" (got {p.tags})")
    b = p.backend
    if b.kind == "docker":
        return ("dedicated_worker: backend docker cannot host a long-lived runtime (a fresh"
                " container per job); use kind nsjail, process or auto")
    if not getattr(b, "warm", True):
        return ("dedicated_worker: the runtime is a warm interpreter in the sandbox; backend.warm"
                " must stay true")
    if getattr(b, "lo_up", False):
        return ("dedicated_worker: lo_up turns warm interpreters off, and with them the"
                " dedicated runtime; leave lo_up false")
    if p.limits.cpu_s is not None:
        return ("limits.cpu_s: a dedicated runtime runs many jobs in one process, so a CPU-time"
                " limit cannot apply to one job; bound jobs with wall_s and cpu_cores")
    return None


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
            lines.append(f"{source}: field '{field}': {err['msg']}{_known_options(err)}")
        raise ProfileError("\n".join(lines)) from None
