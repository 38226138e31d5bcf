"""A wheel built from the repository carries every subpackage, the presets and the license, without a setuptools warning."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOT_SHIPPED = {"tests", "bench", "docs", "build", "dist", "runs", "wandb", "__pycache__"}


def package_dirs() -> list[str]:
    """Every folder of the repository that the wheel must carry, as a package name: Python code or presets."""
    names = []
    for root, dirs, files in os.walk(REPO):
        # Pruned in place: the walk never enters .venv, .git, runs/ and the like.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in NOT_SHIPPED and not d.endswith(".egg-info"))
        rel = Path(root).relative_to(REPO).parts
        if rel and ("__init__.py" in files or (rel[0] == "configs" and files)):
            names.append(".".join(("ember", *rel)))
    return names


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    wanted = {"ember", *package_dirs()}
    assert not wanted - set(listed), f"missing from [tool.setuptools] packages: {sorted(wanted - set(listed))}"
    assert not set(listed) - wanted, f"listed but not a folder of the package: {sorted(set(listed) - wanted)}"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path / "dist"),
                            str(REPO)], check=True, capture_output=True, text=True)
    # Our configuration draws no setuptools warning: SPDX license, every folder of the package listed.
    for warning in ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "would be ignored"):
        assert warning not in build.stdout + build.stderr, warning
    wheel = next((tmp_path / "dist").glob("ember-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ember/configs/pretrain/tiny.yaml" in names and "ember/configs/models/llama-5m.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert not any(n.startswith(("ember/tests/", "ember/.venv", "ember/bench/")) for n in names)

    # A fresh venv; the heavy dependencies are this interpreter's (the import check is about ember's own layout).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.check_output([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    deps = subprocess.check_output([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    code = (
        "import sys; sys.path.append(sys.argv[1])\n"
        "import ember, ember.data, ember.pretrain, ember.finetune, ember.launch, ember.run_config\n"
        "from importlib.resources import files\n"
        "assert ember.__file__.startswith(sys.argv[2]), ember.__file__\n"
        "assert files('ember.configs').joinpath('pretrain/tiny.yaml').is_file()\n"
        "print('ok', ember.__version__)\n"
    )
    out = subprocess.run([str(venv / "bin/python"), "-c", code, deps, site], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
