"""Load-time validation: every algorithm's parameters, the stage list and its shorthands.

Each bad value must fail in ``load_config`` (so in ``raykd show-config``, before a Ray node
or a model), with one line naming the key, the value, what is allowed and the source."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from raykd.config import ConfigError, load_config
from raykd.config.stages import stage_params
from raykd.config.validate import ALGORITHM_RULES

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "conf" / "quickstart.yaml"


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("word_kd.alpha=1.5", "word_kd.alpha", "[0, 1]"),
        ("word_kd.temperature=0", "word_kd.temperature", "> 0"),
        ("learner.lr=-1e-4", "learner.lr", "> 0"),
        ("learner.num_ranks=0", "learner.num_ranks", ">= 1"),
        ("teacher.num_workers=0", "teacher.num_workers", ">= 1"),
        ("rollout.num_workers=0", "rollout.num_workers", ">= 1"),
        ("rollout.max_restarts=-1", "rollout.max_restarts", ">= 0"),
        ("teacher.max_restarts=-2", "teacher.max_restarts", ">= 0"),
        ("teacher.top_k=0", "teacher.top_k", ">= 1"),
        ("word_kd.steps=-1", "word_kd.steps", ">= 1"),
        ("gkd.lmbda=7", "gkd.lmbda", "[0, 1]"),
        ("word_kd.divergence=kl2", "word_kd.divergence", "forward_kl"),
        ("grpo.rewards=[format,vibes]", "grpo.rewards", "reasoning_steps"),
        ("grpo.loss_type=nonsense", "grpo.loss_type", "dr_grpo"),
        ("teacher.dtype=float8", "teacher.dtype", "bfloat16"),
        ("data.task=bugnet2", "data.task", "stdlib_code"),
        ("dense_kd.objective=bogus", "dense_kd.objective", "taid"),
        ("rollout.backend=sglang", "rollout.backend", "hf"),
        ("teacher.backend=nope", "teacher.backend", "hf"),
        ("rollout.weight_sync=carrier_pigeon", "rollout.weight_sync", "object_store"),
        ("reverse_kl.mix_alpha=1.0", "reverse_kl.mix_alpha", "[0, 1)"),
        ("quantize.bits=5", "quantize.bits", "[3, 4, 8]"),
        ("ray.allocator=tcmalloc", "ray.allocator", "jemalloc"),
        ("quantize.group_size=48", "quantize.group_size", "[-1, 16, 32, 64"),
        ("quantize.methods=[gptq,awq]", "quantize.methods", "['gptq', 'rtn']"),
        ("quantize.calibration=0", "quantize.calibration", ">= 1"),
    ],
)
def test_bad_value_names_key_value_range_and_source(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    line = str(err.value)
    assert f"'{key}'" in line and allowed in line
    assert line.startswith(f"command-line override '{override}'")


def test_bad_value_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: [%s]\ngrpo:\n  group_size: 0\n" % (REPO / "conf" / "base.yaml"))
    with pytest.raises(
        ConfigError, match=rf"^{bad}: config key 'grpo.group_size' = 0: must be >= 1"
    ):
        load_config(bad)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(
            QUICKSTART, ["grpo.loss_type=nonsense", "dense_kd.objective=bogus", "gkd.lmbda=7"]
        )
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert {"grpo.loss_type", "dense_kd.objective", "gkd.lmbda"} == {
        line.split("'")[3] for line in lines
    }


def test_divergence_kwargs_and_reward_kwargs_checked_at_load():
    with pytest.raises(ConfigError, match="word_kd.divergence_kwargs.*beta"):
        load_config(
            None, ["word_kd.divergence=forward_kl", "word_kd.divergence_kwargs={beta: 0.5}"]
        )
    load_config(None, ["word_kd.divergence=jsd", "word_kd.divergence_kwargs={beta: 0.5}"])
    with pytest.raises(ConfigError, match="grpo.rewards.*tagret"):
        load_config(None, ["grpo.rewards=[length]", "grpo.reward_kwargs={length: {tagret: 3}}"])


def test_legacy_train_list_becomes_named_stages():
    cfg = load_config(QUICKSTART, ["pipeline.train=[seqkd,gkd]"])
    assert [(s.name, s.algorithm, s.trains) for s in cfg.pipeline.stages] == [
        ("1-seqkd", "seqkd", "student"),
        ("2-gkd", "gkd", "student"),
    ]
    assert cfg.pipeline.train is None


def test_finetune_teacher_becomes_a_teacher_stage():
    cfg = load_config(QUICKSTART, ["pipeline.finetune_teacher=true", "teacher_sft.steps=7"])
    first = cfg.pipeline.stages[0]
    assert (first.name, first.algorithm, first.trains, first.steps) == (
        "teacher-sft", "sft", "teacher", 7,
    )  # fmt: skip
    assert [s.name for s in cfg.pipeline.stages[1:]] == ["1-word_kd", "2-reverse_kl"]


def test_same_algorithm_twice_with_its_own_settings():
    stages = "[{algorithm: word_kd}, {name: hot, algorithm: word_kd, temperature: 2.0, steps: 3}]"
    cfg = load_config(QUICKSTART, [f"pipeline.stages={stages}", "word_kd.steps=11"])
    first, second = (stage_params(cfg, dict(s)) for s in cfg.pipeline.stages)
    assert (first.steps, first.temperature, first.alpha) == (11, 1.0, 0.2)
    assert (second.steps, second.temperature, second.alpha) == (3, 2.0, 0.2)


def test_stage_errors_name_the_entry():
    with pytest.raises(
        ConfigError, match=r"pipeline.stages\[0\].alpha' = 3.0: must be in \[0, 1\]"
    ):
        load_config(None, ["pipeline.stages=[{algorithm: word_kd, alpha: 3}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\].*'alpah'.*Did you mean"):
        load_config(None, ["pipeline.stages=[{algorithm: word_kd, alpah: 3}]"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(
            None, ["pipeline.stages=[{name: a, algorithm: sft}, {name: a, algorithm: sft}]"]
        )
    with pytest.raises(ConfigError, match="only an sft stage can train the teacher"):
        load_config(None, ["pipeline.stages=[{algorithm: gkd, trains: teacher}]"])
    with pytest.raises(ConfigError, match="before student stages"):
        load_config(None, ["pipeline.stages=[{algorithm: sft}, {algorithm: sft, trains: teacher}]"])
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["pipeline={train: [sft], stages: [{algorithm: sft}]}"])


def test_a_later_source_replaces_the_other_stage_form(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("pipeline:\n  train: [sft]\n")
    cfg = load_config(f, ["pipeline.stages=[{algorithm: grpo}]"])
    assert [s.algorithm for s in cfg.pipeline.stages] == ["grpo"]


def test_run_name_cannot_escape_output_dir():
    for name in ("../elsewhere", "a/b", ".hidden"):
        with pytest.raises(ConfigError, match="run.name"):
            load_config(None, [f"run.name={name}"])


def test_every_algorithm_has_rules_and_a_module():
    from raykd.algorithms import ALGORITHMS
    from raykd.config.schema import STAGE_SECTIONS

    assert set(ALGORITHM_RULES) == set(STAGE_SECTIONS) == set(ALGORITHMS)


def test_show_config_fails_fast_without_ray(tmp_path):
    """``raykd show-config`` with bad values exits 2 within seconds, never importing Ray."""
    code = (
        "import sys; from raykd.cli import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(rc)"
    )
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code, "show-config", str(QUICKSTART), "grpo.loss_type=nonsense",
         "dense_kd.objective=bogus", "gkd.lmbda=7"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "grpo.loss_type" in proc.stderr and "gkd.lmbda" in proc.stderr
    assert time.time() - t0 < 60


def test_quantize_group_size_checked_against_a_config_built_student():
    """A student built from ``student.model_config``: its hidden size is in the config."""
    shape = ["student.init=config", "student.model_config={model_type: llama, hidden_size: 96,"
             " intermediate_size: 256, num_attention_heads: 4, num_key_value_heads: 2}"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"group_size=64 does not divide hidden_size=96"):
        load_config(QUICKSTART, [*shape, "quantize.group_size=64"])
    load_config(QUICKSTART, [*shape, "quantize.group_size=32"])  # 96 = 3 x 32


def test_quantize_settings_checked_against_the_teachers_config_file(tmp_path):
    """A student cut from the teacher: checked on the teacher's config.json, before any
    model loads (the pipeline calls this before the Ray node starts)."""
    import json

    from raykd.pipeline.quantize_stage import check_quantize_settings, student_shape_source

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3,
    }))  # fmt: skip
    ok = load_config(QUICKSTART, ["quantize.enabled=true", "quantize.group_size=64"])
    check_quantize_settings(ok, student_shape_source(ok, str(teacher)))
    bad = load_config(QUICKSTART, ["quantize.enabled=true", "quantize.group_size=128"])
    assert student_shape_source(bad, str(teacher)) == str(teacher)  # a layer cut: its sizes
    with pytest.raises(ValueError) as err:
        check_quantize_settings(bad, student_shape_source(bad, str(teacher)))
    assert "quantize.group_size" in str(err.value) and "hidden_size=576" in str(err.value)
    assert str(teacher) in str(err.value)


def test_a_width_pruned_students_sizes_are_checked_once_it_exists(tmp_path):
    """Width pruning changes the layer sizes: nothing to check before the student is built
    (no crash on the unset student.model), then its own config.json is checked."""
    import json

    from raykd.pipeline.quantize_stage import check_quantize_settings, student_shape_source

    cfg = load_config(QUICKSTART, ["quantize.enabled=true", "quantize.group_size=32",
                                   "student.init=width",
                                   "student.target_non_embedding_params=64000000"])  # fmt: skip
    assert student_shape_source(cfg, str(tmp_path)) is None
    check_quantize_settings(cfg, None)
    student = tmp_path / "student_init"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 432, "intermediate_size": 1120,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    }))  # fmt: skip
    with pytest.raises(ValueError, match=r"group_size=32 does not divide hidden_size=432"):
        check_quantize_settings(cfg, str(student))


def test_vllm_backend_needs_quantized_codes_vllm_loads():
    """The quantized students are evaluated by the rollout backend: with vLLM, asymmetric or
    3-bit codes are refused at load (vLLM's GPTQ path takes symmetric 4/8-bit only)."""
    base = ["rollout.backend=vllm", "quantize.enabled=true"]
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [*base, "quantize.sym=false", "quantize.bits=3"])
    line = str(err.value)
    assert "'quantize.sym'" in line and "'quantize.bits'" in line and "(4, 8)" in line
    cfg = load_config(QUICKSTART, [*base, "quantize.sym=true", "quantize.bits=4"])
    assert cfg.quantize.sym is True
    # the hf backend loads every layout raykd writes
    assert load_config(QUICKSTART, ["quantize.enabled=true", "quantize.bits=3"]).quantize.bits == 3


def test_width_student_without_target_or_sizes_fails_at_load():
    with pytest.raises(ConfigError, match=r"student.target_non_embedding_params.*width_sizes"):
        load_config(QUICKSTART, ["student.init=width"])
    cfg = load_config(QUICKSTART, ["student.init=width", "student.width_sizes.hidden_size=256"])
    assert cfg.student.width_sizes["hidden_size"] == 256
