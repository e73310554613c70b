"""Where a job goes: its tag (explicit, else the script's, else the language's default),
with $workspace and $args[name] interpolated."""

from __future__ import annotations

import re
from typing import Any

DEFAULT_TAGS = {"python3": "python3", "bash": "bash", "postgresql": "postgresql", "http": "http",
                "sleep": "native", "noop": "native"}
LANGUAGES = tuple(DEFAULT_TAGS)

_ARG_REF = re.compile(r"\$args\[([A-Za-z_][A-Za-z0-9_]*)\]")
_RESTRICTED = re.compile(r"^(?P<tag>[^()]+)\((?P<ws>[^()]+)\)$")


class RoutingError(ValueError):
    """A tag that cannot be resolved for this job; the message says why."""


def interpolate(template: str, workspace: str, args: dict[str, Any], what: str = "tag") -> str:
    """Replace $workspace and $args[name] in ``template``."""

    def arg(m: re.Match) -> str:
        name = m.group(1)
        if name not in args:
            raise RoutingError(f"{what} {template!r} refers to $args[{name}], but the job has no argument {name!r}")
        v = args[name]
        return v if isinstance(v, str) else str(v)

    return _ARG_REF.sub(arg, template.replace("$workspace", workspace))


def dedicated_tag(workspace: str, path: str) -> str:
    """The tag of a dedicated script's jobs: its group's workers serve it (Windmill's form)."""
    return f"{workspace}:{path}"


def resolve_tag(language: str, workspace: str, args: dict[str, Any],
                explicit: str | None = None, script_tag: str | None = None) -> str:
    """The tag a job is queued under."""
    template = explicit or script_tag or DEFAULT_TAGS[language]
    tag = interpolate(template, workspace, args)
    if not tag or _RESTRICTED.match(tag) or any(c in tag for c in " |,"):
        raise RoutingError(f"bad tag {tag!r}")
    return tag
