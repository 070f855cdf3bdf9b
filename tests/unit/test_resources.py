"""The bundles a run reserves (what a Tune trial's PlacementGroupFactory must hold)."""

from raykd.config import load_config
from raykd.pipeline.resources import run_bundles, slot_bundles, slot_indices


def test_kd_then_reverse_kl_reserves_every_role_once():
    cfg = load_config(None, ["learner.num_ranks=2", "learner.cpus_per_rank=1",
                             "learner.gpus_per_rank=1", "rollout.num_workers=3",
                             "teacher.gpus_per_worker=0.5"])  # fmt: skip
    slots = slot_bundles(cfg)
    assert set(slots) == {"learner", "rollout", "teacher"}
    assert slots["learner"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert slots["rollout"] == [{"CPU": 0.5}] * 3
    assert slots["teacher"] == [{"CPU": 0.5, "GPU": 0.5}]
    bundles = run_bundles(cfg)
    assert len(bundles) == 1 + 2 + 3 + 1 and bundles[0] == {"CPU": 0.5}
    idx = slot_indices(cfg)
    assert idx == {"learner": [1, 2], "rollout": [3, 4, 5], "teacher": [6]}
    assert sum(b.get("GPU", 0) for b in bundles) == 2.5


def test_sft_only_needs_no_teacher_scorer_and_gkd_teacher_samples_need_a_second_sampler_set():
    sft = load_config(None, ["pipeline.train=[sft]"])
    assert set(slot_bundles(sft)) == {"learner", "rollout"}
    gkd = load_config(None, ["pipeline.train=[gkd]", "gkd.off_policy=teacher", "gkd.lmbda=0.5"])
    assert set(slot_bundles(gkd)) == {"learner", "rollout", "teacher", "teacher_rollout"}
    mixed = load_config(None, ["pipeline.train=[reverse_kl]", "reverse_kl.mix_alpha=0.2"])
    assert "teacher" not in slot_bundles(mixed)  # the mixing samplers hold the teacher
    ref = load_config(None, ["pipeline.train=[grpo]", "grpo.beta=0.1"])
    assert "teacher" in slot_bundles(ref)  # the frozen reference


def test_the_quantize_task_gets_its_own_bundle_only_when_enabled():
    off = load_config(None, ["pipeline.train=[sft]"])
    assert "quantize" not in slot_bundles(off)
    on = load_config(None, ["pipeline.train=[sft]", "quantize.enabled=true", "quantize.cpus=2"])
    assert slot_bundles(on)["quantize"] == [{"CPU": 2.0}]
    assert len(run_bundles(on)) == len(run_bundles(off)) + 1
    assert slot_indices(on)["quantize"] == [len(run_bundles(on)) - 1]
