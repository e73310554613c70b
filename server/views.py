"""The JSON the API answers with, shaped from store rows (Windmill's field names)."""

from __future__ import annotations

from typing import Any


def _iso(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else v


def _script_json(s: dict[str, Any]) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in s.items()}
    out["timeout"] = out.pop("timeout_s")
    out["workspace_id"] = out.pop("workspace")
    return out


def _job_json(j: dict[str, Any], logs: str) -> dict[str, Any]:
    completed = j["type"] == "CompletedJob"
    out = {
        "id": str(j["id"]), "type": j["type"], "workspace_id": j["workspace"],
        "job_kind": j["kind"], "script_path": j["script_path"], "script_hash": j["script_hash"],
        "language": j["language"], "args": j["args"], "tag": j["tag"], "priority": j["priority"],
        "created_by": j["created_by"], "created_at": _iso(j["created_at"]),
        "scheduled_for": _iso(j["scheduled_for"]), "started_at": _iso(j["started_at"]),
        # a job held ahead by a worker is not running until it starts
        "worker": j["worker"], "running": (not completed) and j["running"] and j["started_at"] is not None,
        "canceled": j["status"] == "canceled" if completed else j["canceled"],
        "canceled_by": j["canceled_by"], "canceled_reason": j["canceled_reason"],
        "restarts": j["restarts"], "logs": logs, "raw_code": j.get("content"),
        "success": j["status"] == "success" if completed else None,
        "result": j["result"] if completed else None,
        "duration_ms": j["duration_ms"] if completed else None,
        "mem_peak": j["mem_peak"] if completed else None,
    }
    if completed:
        out.update(status=j["status"], error=j["error"], cpu_ms=j["cpu_ms"], outcome=j["outcome"],
                   completed_at=_iso(j["completed_at"]))
        # a GPU job's GPUs, peak GPU memory and busy time (beside mem_peak; worker/gpus.py)
        out["gpu"] = (j["outcome"] or {}).get("gpu") if isinstance(j["outcome"], dict) else None
    else:
        out["last_ping"] = _iso(j["last_ping"])
    return out


def _listed_json(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in r.items()}
    out["id"] = str(r["id"])
    out["success"] = (r["status"] == "success") if r["status"] else None
    return out


def _worker_json(w: dict[str, Any]) -> dict[str, Any]:
    info = w["info"] or {}
    return {
        "worker": w["name"], "worker_group": w["worker_group"], "hostname": w["hostname"],
        "tags": w["tags"], "backend": w["backend"], "subworkers": w["subworkers"],
        # why this backend: named by the profile, or what kind: auto chose and why
        "backend_reason": info.get("backend_reason"),
        # the scripts a dedicated worker serves ("<workspace>:<path>"), [] for none
        "dedicated": info.get("dedicated", []),
        "cpus": info.get("cpus"), "memory_mb": info.get("memory_mb"), "gpus": info.get("gpus", []),
        # a GPU worker's GPUs and the jobs holding each now ([{"index", "name", "jobs"}])
        "gpu_jobs": w.get("gpu_jobs") or [],
        "version": info.get("version"), "started_at": _iso(w["started_at"]),
        "last_ping": _iso(w["last_ping"]), "last_ping_s_ago": round(w["last_ping_s_ago"], 1),
        "jobs_done": w["jobs_done"], "busy": w["busy"], "occupancy": w["occupancy"],
        # busy share of the slots' time over 15 s, 5 min, 30 min (what the autoscaler reads)
        "occupancy_15s": w.get("occupancy_15s", 0.0), "occupancy_5m": w.get("occupancy_5m", 0.0),
        "occupancy_30m": w.get("occupancy_30m", 0.0),
    }
