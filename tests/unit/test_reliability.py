"""Trust boundaries and provenance: checkpoints load weights-only, configs are compared key by
key, the embedded node is configured for loopback before Ray is imported."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from raykd.pipeline.provenance import Provenance, RunDirConflict, config_diff, digest


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/raykd-pwned",))


def test_checkpoint_reader_refuses_a_pickle_that_runs_code(tmp_path):
    from raykd.roles.learner import _weights_only_load

    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, good)
    assert _weights_only_load(str(good))["step"] == 3
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"x": _Exploit()}, fh)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _weights_only_load(str(bad))
    assert not os.path.exists("/tmp/raykd-pwned")


def test_config_diff_names_changed_keys_and_ignores_resume_settings():
    old = {"run": {"resume": True, "name": "a"}, "word_kd": {"steps": 40}, "ray": {"num_cpus": 2}}
    new = {"run": {"resume": False, "name": "a"}, "word_kd": {"steps": 10}, "ray": {"num_cpus": 8}}
    assert config_diff(old, new) == ["word_kd.steps: 40 -> 10"]
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1}) != digest({"a": 2, "b": 2})


def test_a_result_made_from_other_inputs_is_refused_unless_overwrite(tmp_path):
    from omegaconf import OmegaConf

    record = tmp_path / "stages" / "s.json"
    record.parent.mkdir()
    record.write_text('{"config_hash": "old", "steps": 1}')
    out = tmp_path / "models" / "s"
    out.mkdir(parents=True)
    cfg = OmegaConf.create({"run": {"overwrite": False, "resume": True}})
    prov = Provenance(tmp_path, cfg)
    assert prov.reuse(record, "old", [out]) == {"config_hash": "old", "steps": 1}
    with pytest.raises(RunDirConflict, match="other inputs"):
        prov.reuse(record, "new", [out])
    prov = Provenance(tmp_path, OmegaConf.create({"run": {"overwrite": True, "resume": True}}))
    assert prov.reuse(record, "new", [out]) is None
    assert not record.exists() and not out.exists() and prov.redo_rest


def test_embedded_node_is_set_to_loopback_before_ray_is_imported():
    code = "import raykd, os, sys; assert 'ray' not in sys.modules; " \
           "print(os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'])"  # fmt: skip
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0", out.stderr
    env["RAY_ADDRESS"] = "http://10.0.0.1:8265"  # under `ray job submit`: Ray's own addressing
    code = "import raykd, os; print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr
