"""A learner SIGKILLed while it writes a checkpoint leaves the previous checkpoint loadable:
a real DeepSpeed learner (no Ray: the rank in a plain process) saves at step 2, trains on,
and dies in the middle of the step-3 save, either inside DeepSpeed's writing (a half-written
file) or between the two renames that swap the new directory in. A fresh learner then loads
step 2's state and weights, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

SCRIPT = r"""
import io, os, signal, sys
import torch
from safetensors.torch import save_file
from raykd.algorithms.supervised import sft_loss
from raykd.roles.learner import Learner
from raykd.roles.runtime import free_port

model, ckpt, mode, out = sys.argv[1:5]
learner = Learner(0, 1, 1)
learner.setup("127.0.0.1", free_port(), model, dict(
    zero_stage=1, lr=1e-2, weight_decay=0.0, betas=[0.9, 0.95], warmup_steps=0,
    micro_batch_size=2, grad_accum=1, grad_clip=1.0, seed=0))
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 250, (2, 12), generator=g)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones(2, 12)}


def weights(path):
    save_file({k: v.clone() for k, v in learner.state_dict().items()}, path)  # untied


if mode == "load":
    state = learner.load_checkpoint(ckpt)
    print("STATE", state["step"], flush=True)
    weights(out)
    sys.exit(0)
for _ in range(2):
    learner.train_step([batch], sft_loss)
learner.save_checkpoint(ckpt, {"step": 2})
weights(out)
learner.train_step([batch], sft_loss)
if mode == "deepspeed_write":  # the first file DeepSpeed writes is cut in half, then death
    real = torch.save

    def dying_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf, *a, **k)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
else:  # between_renames: the old checkpoint moved aside, the new one not yet in place
    real_rename = os.rename

    def dying_rename(src, dst):
        if str(src).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst)

    os.rename = dying_rename
learner.save_checkpoint(ckpt, {"step": 3})
print("NOT KILLED", flush=True)
"""


@pytest.mark.parametrize("kill_at", ["deepspeed_write", "between_renames"])
def test_kill_during_checkpoint_write_keeps_the_previous_one(tiny_teacher, tmp_path, kill_at):
    script = tmp_path / "learner.py"
    script.write_text(SCRIPT)
    ckpt = tmp_path / "ckpt"

    def run(mode, out):
        cmd = [sys.executable, str(script), tiny_teacher, str(ckpt), mode, str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    died = run(kill_at, tmp_path / "step2.safetensors")
    assert died.returncode == -9, died.stdout[-2000:] + died.stderr[-3000:]
    assert "NOT KILLED" not in died.stdout
    if kill_at == "between_renames":  # the kill left the old checkpoint aside, none in place
        assert not ckpt.exists() and (tmp_path / "ckpt.old").is_dir()
    else:  # the half-written files are in the staging directory, never in the checkpoint
        assert (tmp_path / "ckpt.tmp").is_dir()
        assert json.loads((ckpt / "raykd_state.json").read_text()) == {"step": 2}

    loaded = run("load", tmp_path / "loaded.safetensors")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "STATE 2" in loaded.stdout
    want = load_file(tmp_path / "step2.safetensors")
    got = load_file(tmp_path / "loaded.safetensors")
    assert want.keys() == got.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=0, msg=name)
