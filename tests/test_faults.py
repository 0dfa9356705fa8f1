"""Bad inputs a user can give end in one clear line and never cost data: corrupt or damaged
checkpoints, and sample destinations that cannot be written."""

import os
import random

import pytest
import torch

from dlm.cli import main
from dlm.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dlm.runs.build import load_run
from dlm.runs.train import train


def test_random_bytes_are_never_loaded_and_never_raise_anything_but_a_checkpoint_error(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "noise.pt"
    for size in [rng.randrange(1, 4000) for _ in range(200)]:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(size)))
        with pytest.raises(CheckpointError, match="corrupt or not a dlm checkpoint"):
            load_checkpoint(path)


def test_a_flipped_byte_inside_a_tensor_fails_the_checksum(tmp_path):
    marker = torch.full((256,), 1.2345)
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": marker}, "step": 3})
    assert load_checkpoint(path)["step"] == 3  # intact: loads, and the checksum is not part of the payload
    raw = bytearray(path.read_bytes())
    at = raw.find(marker[:4].numpy().tobytes())
    assert at > 0
    raw[at + 2] ^= 0x10  # a bit flip inside the tensor's data, the zip structure untouched
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="failed its checksum"):
        load_checkpoint(path)


def test_a_dlm_file_without_config_is_a_checkpoint_error_not_a_key_error(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": {}, "step": 0, "epoch": 0})
    with pytest.raises(CheckpointError, match="without config, vocab"):
        load_run(run)


@pytest.mark.parametrize("where", ["folder", "under_a_file", "read_only"])
def test_sample_checks_its_destination_before_sampling(smoke_config, tmp_path, capsys, where):
    run = tmp_path / "run"
    train(smoke_config.replace(max_steps=2), run)
    (tmp_path / "afile").write_text("keep me")
    locked = tmp_path / "locked"
    locked.mkdir()
    out = {"folder": tmp_path, "under_a_file": tmp_path / "afile" / "s.jsonl", "read_only": locked / "s.jsonl"}[where]
    if where == "read_only":
        locked.chmod(0o500)
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is still writable")
    try:
        assert main(["sample", "--run_dir", str(run), "--num_samples", "2", "--steps", "2", "--out", str(out)]) == 2
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlm sample: error:") and "Traceback" not in err[0]
    assert (tmp_path / "afile").read_text() == "keep me"
