"""deploy/: the kustomize base renders (`kubectl kustomize deploy/k8s`) into the server
Deployment and Service, one worker Deployment per shipped profile, the autoscaler's RBAC
and the profiles ConfigMap; its generated parts are up to date with profiles/*.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sandmill.profiles import profile_from_dict, shipped_names

REPO = Path(__file__).resolve().parent.parent


def test_generated_parts_are_up_to_date():
    r = subprocess.run([sys.executable, str(REPO / "deploy/k8s/generate.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed (.ci/setup.sh installs it where apt has it)")
    r = subprocess.run(["kubectl", "kustomize", str(REPO / "deploy/k8s")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in objs if o["kind"] == kind])
    return found[0]


def test_rendered_objects(objects):
    assert all(o["metadata"].get("namespace") == "sandmill" for o in objects if o["kind"] != "Namespace")
    cm = _one(objects, "ConfigMap")
    assert cm["metadata"]["name"].startswith("sandmill-profiles-")  # hashed: a change rolls the pods
    assert sorted(cm["data"]) == [f"{n}.yaml" for n in shipped_names()]
    for name, text in cm["data"].items():
        assert text == (REPO / "profiles" / name).read_text()
        profile_from_dict(yaml.safe_load(text), source=name)  # each is a valid profile

    server = _one(objects, "Deployment", "sandmill-server")
    spec = server["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "sandmill-autoscaler"
    c = spec["containers"][0]
    assert c["args"][:1] == ["server"] and "0.0.0.0" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["SANDMILL_PROFILES"]["value"] == "/etc/sandmill/profiles"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "sandmill-database", "key": "url"}
    assert {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v} == {cm["metadata"]["name"]}
    svc = _one(objects, "Service", "sandmill")
    assert svc["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]

    for group in shipped_names():
        d = _one(objects, "Deployment", f"sandmill-worker-{group}")
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels["sandmill.dev/group"] == group  # what the kubernetes integration selects
        assert d["spec"]["selector"]["matchLabels"] == {"sandmill.dev/group": group}
        w = d["spec"]["template"]["spec"]
        assert w["containers"][0]["args"] == ["worker", "--profile", f"/etc/sandmill/profiles/{group}.yaml"]
        assert w["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
        assert w["terminationGracePeriodSeconds"] > 30  # past the worker's own grace for its jobs
    gpu = _one(objects, "Deployment", "sandmill-worker-gpu")["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] >= 1

    role = _one(objects, "Role", "sandmill-autoscaler")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules[(("apps",), ("deployments", "deployments/scale"))] == {"get", "patch"}
    assert rules[(("",), ("pods",))] == {"list", "patch"}
    rb = _one(objects, "RoleBinding", "sandmill-autoscaler")
    assert rb["roleRef"]["name"] == "sandmill-autoscaler"
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "sandmill-autoscaler", "namespace": "sandmill"}]
    _one(objects, "ServiceAccount", "sandmill-autoscaler")


def test_build_script_uses_no_registry():
    text = (REPO / "deploy/build.sh").read_text()
    assert "debootstrap" in text and "docker import" in text and "FROM " not in text
    r = subprocess.run(["bash", "-n", str(REPO / "deploy/build.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
