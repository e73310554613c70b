"""The Vagrantfile defines the test VMs and provisions them with the CI script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VAGRANTFILE = REPO / "Vagrantfile"
VMS = {"debian12": "debian/bookworm64", "ubuntu2404": ("bento/ubuntu-24.04", "ubuntu/noble64")}


def test_vagrantfile_structure() -> None:
    """Cheap check, no vagrant needed: both VMs, their boxes, the shared provisioning."""
    text = VAGRANTFILE.read_text()
    for name, boxes in VMS.items():
        boxes = (boxes,) if isinstance(boxes, str) else boxes
        assert re.search(rf'"{name}"\s*=>\s*"({"|".join(map(re.escape, boxes))})"', text), \
            f"VM {name} with box {boxes} not defined"
    assert "config.vm.define" in text
    assert "bash /vagrant/tests/vm/provision.sh" in text, "VMs must run tests/vm/provision.sh"
    provision = (REPO / "tests" / "vm" / "provision.sh").read_text()
    assert "bash .ci/setup.sh" in provision, "VMs must provision with .ci/setup.sh"
    assert "tests/isolation" in provision
    assert re.search(r'synced_folder\s+"\."\s*,\s*"/vagrant"', text)
    assert (REPO / ".ci" / "setup.sh").is_file()


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed")
def test_vagrant_validate(tmp_path: Path) -> None:
    """`vagrant validate` parses the file and checks every VM's configuration.
    --ignore-provider: CI hosts have no hypervisor; the provider blocks are checked
    only where one is installed."""
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant")}  # keep the repo clean
    r = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
