"""The weights digest that keys TensorRT's engine cache: right when files change, cheap when they do not."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file

from engines.digests import weights_digest


def _model_folder(root: Path, scale: float = 1.0) -> Path:
    folder = root / "unet"
    folder.mkdir(parents=True)
    save_file({"weight": torch.full((4, 4), scale)}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def test_the_digest_follows_the_weights_content(tmp_path: Path) -> None:
    first = weights_digest(_model_folder(tmp_path / "a"), tmp_path / "memo")
    same = weights_digest(_model_folder(tmp_path / "b"), tmp_path / "memo")
    other = weights_digest(_model_folder(tmp_path / "c", scale=2.0), tmp_path / "memo")
    assert first == same != other


def test_a_read_only_model_folder_is_hashed_once(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "model")
    weights = folder / "diffusion_pytorch_model.safetensors"
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        digest = weights_digest(folder, tmp_path / "memo")
        (memo,) = (tmp_path / "memo").iterdir()
        assert memo.read_text().endswith(hashlib.sha256(weights.read_bytes()).hexdigest())
        assert sorted(file.name for file in folder.iterdir()) == ["config.json", weights.name]

        # The remembered hash is what a second start uses: it does not read the weights again.
        memo.write_text(memo.read_text()[:-64] + "0" * 64)
        assert weights_digest(folder, tmp_path / "memo") != digest
    finally:
        folder.chmod(stat.S_IRWXU)


def test_a_replaced_file_is_hashed_again(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "model")
    before = weights_digest(folder, tmp_path / "memo")
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file({"weight": torch.full((4, 4), 3.0)}, str(weights))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert weights_digest(folder, tmp_path / "memo") != before
    assert weights_digest(folder, tmp_path / "memo") == weights_digest(
        _model_folder(tmp_path / "x", 3.0), tmp_path / "m"
    )


def test_a_hub_snapshot_gives_the_same_digest_without_reading_its_blobs(tmp_path: Path) -> None:
    plain = _model_folder(tmp_path / "plain")
    repo = tmp_path / "hub" / "models--studio--chara"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("1" * 40) / "unet"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in plain.iterdir():
        content = file.read_bytes()
        blob = blobs / hashlib.sha256(content).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))

    from_snapshot = weights_digest(snapshot, tmp_path / "snapshot-memo")
    assert from_snapshot == weights_digest(plain, tmp_path / "memo")
    assert not (tmp_path / "snapshot-memo").exists()  # nothing was hashed, so nothing was remembered
