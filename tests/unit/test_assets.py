"""find_assets: KUBEBUILDER_ASSETS first, else hack/k8s-assets.sh, else a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from workerqueue_operator.devcluster import assets
from workerqueue_operator.devcluster.assets import BINARIES, AssetsError, find_assets


def fake_binaries(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        if name not in skip:
            (folder / name).write_text("#!/bin/sh\n")
            (folder / name).chmod(0o755)
    return folder


def fake_script(path: Path, body: str) -> Path:
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    return path


def test_kubebuilder_assets_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fake_binaries(tmp_path / "bin")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(folder))
    # A script that would fail proves it is not run.
    monkeypatch.setattr(assets, "ASSETS_SCRIPT", fake_script(tmp_path / "assets.sh", "exit 1"))
    assert find_assets() == folder


def test_incomplete_kubebuilder_assets_falls_back_to_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(fake_binaries(tmp_path / "partial", skip=("kubectl",))))
    built = fake_binaries(tmp_path / "built")
    script = fake_script(tmp_path / "assets.sh", f"echo building >&2\necho noise\necho {built}")
    monkeypatch.setattr(assets, "ASSETS_SCRIPT", script)

    assert find_assets() == built
    assert "building" in capfd.readouterr().err  # progress goes through to the user


def test_non_executable_binaries_do_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fake_binaries(tmp_path / "bin")
    (folder / "etcd").chmod(0o644)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(folder))
    monkeypatch.setattr(assets, "ASSETS_SCRIPT", tmp_path / "missing.sh")
    with pytest.raises(AssetsError, match="KUBEBUILDER_ASSETS"):
        find_assets()


def test_failing_script_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setattr(assets, "ASSETS_SCRIPT", fake_script(tmp_path / "assets.sh", "exit 3"))
    with pytest.raises(AssetsError, match="exit code 3"):
        find_assets()


def test_script_printing_an_incomplete_folder_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    partial = fake_binaries(tmp_path / "partial", skip=("helm",))
    monkeypatch.setattr(assets, "ASSETS_SCRIPT", fake_script(tmp_path / "assets.sh", f"echo {partial}"))
    with pytest.raises(AssetsError, match="helm"):
        find_assets()
