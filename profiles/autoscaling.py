"""A worker group's ``autoscaling`` settings: Windmill's names and defaults, and the
integration that applies the count the autoscaler (server/autoscale) decides."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalIntegration(_Integration):
    """``local``: the `sandmill up` supervisor starts and stops the group's worker processes."""

    type: Literal["local"] = "local"


class DryrunIntegration(_Integration):
    """``dryrun``: the decisions are recorded as events, nothing is started or stopped."""

    type: Literal["dryrun"]


class ScriptIntegration(_Integration):
    """``script``: the server runs ``path`` with the arguments group, desired workers,
    reason and event type (Windmill's order); its exit status and output are recorded."""

    type: Literal["script"]
    path: str = Field(min_length=1)
    # Windmill runs its script as a job with this tag; sandmill runs the command on the
    # server's host, so the tag is accepted (configs carry over) and not used
    tag: str | None = None
    timeout_s: float = Field(60.0, gt=0, le=3600)


class KubernetesIntegration(_Integration):
    """``kubernetes``: patch the group's Deployment's replicas through the official client
    (in-cluster config, else kubeconfig), setting each pod's pod-deletion-cost first when
    scaling in so idle pods go first."""

    type: Literal["kubernetes"]
    namespace: str | None = None      # default: the pod's own namespace, else "default"
    deployment: str | None = None     # default: sandmill-worker-<group>
    label_selector: str | None = None  # the group's pods; default: sandmill.dev/group=<group>
    kubeconfig: str | None = None     # outside a cluster: this file, else ~/.kube/config


Integration = Annotated[Union[LocalIntegration, DryrunIntegration, ScriptIntegration,
                              KubernetesIntegration], Field(discriminator="type")]


class Autoscaling(BaseModel):
    """Windmill's autoscaling config of a worker group (the rules: server/autoscale/rules.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    min_workers: int = Field(1, ge=0, le=10_000)
    max_workers: int = Field(10, ge=0, le=10_000)
    cooldown_seconds: int = Field(300, ge=0)  # after an incremental scale-in/out
    full_scale_cooldown_seconds: int = Field(1800, ge=0)  # after a full scale-out, before a scale-in
    inc_scale_num_jobs_waiting: int = Field(1, ge=1)  # jobs waiting that step out
    full_scale_jobs_waiting: int | None = Field(None, ge=0)  # more than this: straight to max (default max_workers)
    dec_scale_occupancy_rate: int = Field(25, ge=0, le=100)  # % under which (all windows) it steps in
    inc_scale_occupancy_rate: int = Field(75, ge=0, le=100)  # % over which (15 s window) it steps out
    inc_num_workers: int | None = Field(None, ge=1)  # the step (default (max - min) / 5, at least 1)
    custom_tags: list[str] | None = None  # count these tags' jobs instead of the group's
    integration: Integration = Field(default_factory=LocalIntegration)

    @model_validator(mode="after")
    def _sane(self) -> "Autoscaling":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) is more than max_workers ({self.max_workers})")
        if self.enabled and self.max_workers < 1:
            raise ValueError("max_workers must be at least 1 when autoscaling is enabled")
        if self.dec_scale_occupancy_rate >= self.inc_scale_occupancy_rate:
            raise ValueError(f"dec_scale_occupancy_rate ({self.dec_scale_occupancy_rate}) must be below"
                             f" inc_scale_occupancy_rate ({self.inc_scale_occupancy_rate})")
        if self.custom_tags is not None and not self.custom_tags:
            raise ValueError("custom_tags, when given, names at least one tag")
        for t in self.custom_tags or []:
            if not re.match(r"^[A-Za-z0-9_.\-$\[\]]+(\([A-Za-z0-9_\-+]+\))?$", t):
                raise ValueError(f"custom_tags: bad tag {t!r}: letters, digits, _ - . and an optional (ws1+ws2)")
        return self

    @property
    def step(self) -> int:
        """Workers added or removed by an incremental scale-out or scale-in."""
        if self.inc_num_workers is not None:
            return self.inc_num_workers
        return max(1, (self.max_workers - self.min_workers) // 5)

    @property
    def full_scale_waiting(self) -> int:
        """More jobs waiting than this: straight to max_workers."""
        return self.max_workers if self.full_scale_jobs_waiting is None else self.full_scale_jobs_waiting
