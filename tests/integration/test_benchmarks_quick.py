"""The benchmark scripts' ``--quick`` modes run and write valid JSON with the expected keys and
sane, finite numbers (tiny models; no timing is asserted, only that the figures exist and
make sense: positive durations, shares within [0, 1], sizes in the right order)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from render import BEGIN, END  # noqa: E402

#: The quick runs: ``name -> (script, extra arguments)``. Cases the other runs already cover
#: are left out (the TRL runner is the same for both of its benchmarks; the actors' side of
#: ``ray_overhead`` is ``onpolicy_step``'s ``raykd`` path). Every case joins the session's Ray
#: node instead of starting one of its own (so its memory figure is the driver's alone).
RUNS = {
    "onpolicy": ("onpolicy_step.py", ["--cases", "trl_gkd", "raykd_lm", "raykd_bf16"]),
    "ray_overhead": ("ray_overhead.py", ["--cases", "local"]),
    "offpolicy": ("offpolicy_step.py", ["--cases", "raykd_word_kd"]),
    "weight_sync": ("weight_sync.py", []),
    "teacher_scoring": ("teacher_scoring.py", []),
    "learner_step": ("learner_step.py", []),
}


def run_quick(script: str, out: Path, env: dict, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out),
           *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-> " in proc.stdout  # the table was printed, then where the JSON went
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick_runs(ray_node, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The directory of the quick runs' JSONs (``<script>_quick.json``, as ``make bench``'s
    ``--quick`` counterparts are named) and every JSON by name."""
    import ray

    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "RAYKD_BENCH_CACHE": str(tmp / "cache"),
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # fmt: skip
    out = {n: run_quick(script, tmp / "results" / f"{Path(script).stem}_quick.json", env, extra)
           for n, (script, extra) in RUNS.items()}  # fmt: skip
    for data in out.values():
        assert data["quick"] is True and data["machine"]["cores"] >= 1
        assert data["commit"] is None or len(data["commit"].removesuffix("+dirty")) >= 7
    return tmp / "results", out


@pytest.fixture(scope="module")
def results(quick_runs) -> dict[str, dict]:
    """Every quick run's JSON by name."""
    return quick_runs[1]


def finite_positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def check_step_case(case: dict, phases: tuple[str, ...]) -> None:
    s = case["s_per_step"]
    assert s["n"] >= 1 and finite_positive(s["mean"], s["median"], s["min"], s["max"])
    assert s["min"] <= s["median"] <= s["max"]
    assert finite_positive(case["peak_memory_gib"])
    for p in phases:
        assert math.isfinite(case["phases"][p]) and case["phases"][p] >= 0, p
    # the phases add up to no more than the step (what is left is controller work)
    assert sum(case["phases"][p] for p in phases) <= s["mean"] * (1 + 1e-6) + 1e-6


def test_onpolicy_step_quick(results):
    data = results["onpolicy"]
    trl, rk = data["cases"]["trl_gkd"], data["cases"]["raykd_lm"]
    check_step_case(trl, ("sampling", "teacher_scoring", "learner"))
    raykd_phases = ("sampling", "scoring", "learner", "weight_sync")  # one after another
    check_step_case(rk, raykd_phases)
    # teacher scoring and the old log-probs run side by side inside the scoring phase
    assert max(rk["phases"]["teacher_scoring"], rk["phases"]["old_logprobs"]) <= (
        rk["phases"]["scoring"] + 1e-6
    )
    assert 0 <= rk["phases"]["ray_overhead"] <= sum(rk["phases"][p] for p in raykd_phases)
    for case in (trl, rk):
        assert finite_positive(case["generated_tokens_per_s"], case["generated_tokens_per_step"])
    # bfloat16 samplers: their log q no longer match the float32 learner's, which recomputes
    # log q_old every step (the float32 samplers' are trusted after the first step)
    bf16 = data["cases"]["raykd_bf16"]
    assert bf16["phases"]["old_logprobs"] > 0 and rk["phases"]["old_logprobs"] == 0
    assert finite_positive(data["ratios"]["raykd_lm_throughput_vs_trl"])


def test_ray_overhead_quick(results):
    """The in-process case (the actors' case is the on-policy benchmark's path)."""
    local = results["ray_overhead"]["cases"]["local"]
    check_step_case(local, ("sampling", "scoring", "learner", "weight_sync"))
    # no actors: the "overhead" is only the controller's own work between calls in a phase
    walls = ("sampling", "scoring", "learner", "weight_sync")
    assert local["phases"]["ray_overhead"] <= sum(local["phases"][p] for p in walls) + 1e-6


def test_offpolicy_step_quick(results):
    rk = results["offpolicy"]["cases"]["raykd_word_kd"]
    check_step_case(rk, ("learner",))
    assert finite_positive(rk["teacher_fill_seconds"], rk["trained_tokens_per_s"])


def test_weight_sync_quick(results):
    data = results["weight_sync"]
    hf = data["hf"]
    assert set(hf["sync_seconds"]) == set(hf["sync_vs_plain_copy"]) == {
        "shared_memory", "object_store"}  # fmt: skip
    for name, spread in hf["sync_seconds"].items():
        assert finite_positive(spread["median"], hf["sync_vs_plain_copy"][name],
                               hf["first_sync_seconds"][name])  # fmt: skip
        assert spread["min"] <= spread["median"] <= spread["max"]
    assert finite_positive(hf["plain_copy_seconds"]["median"])
    # a sync ships each storage once: tied embeddings are not sent twice
    assert hf["shipped_mb"] <= hf["unique_storage_mb"] + 1e-6 < hf["state_dict_mb"]
    assert data["vllm_skipped"] == "--quick"


def test_teacher_scoring_quick(results):
    data = results["teacher_scoring"]
    for key in ("token_logprobs", "topk_targets", "in_process_token_logprobs", "cache_fill"):
        assert finite_positive(data[key]["tokens_per_s"]), key
    b = data["bytes_per_response_token"]
    assert b["topk_in_memory"] == data["top_k"] * 8
    assert finite_positive(b["topk_cache_on_disk"])
    assert b["topk_cache_on_disk"] < b["full_logits_fp32"]


def test_learner_step_quick(results):
    data = results["learner_step"]
    for name in ("in_process", "actor", "actor_jemalloc"):
        case = data["cases"][name]
        assert finite_positive(case["wall_per_call"]["median"], case["cpu_per_call"]["median"])
        assert all(math.isfinite(x) for x in case["losses"]), case["losses"]
    # same learner, data and seed in both places: the same losses, call by call
    assert data["summary"]["same_losses"] is True
    a, b, j = (data["cases"][n]["losses"] for n in ("in_process", "actor", "actor_jemalloc"))
    assert len(a) == len(b) == len(j) >= 1
    assert j == pytest.approx(a, rel=1e-5, abs=1e-6)  # the allocator changes no number
    assert finite_positive(data["summary"]["jemalloc_vs_system_wall"])


def render_into(doc: Path, results_dir: Path) -> str:
    cmd = [sys.executable, str(REPO / "benchmarks" / "render.py"), "--quick", "--results",
           str(results_dir), "--out", str(doc)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return doc.read_text()


def split_section(text: str) -> tuple[str, str]:
    """``(text outside the markers, the generated section)``; ``("text", "")`` without them."""
    if BEGIN not in text:
        return text, ""
    begin, end = text.index(BEGIN), text.index(END) + len(END) + 1
    return text[:begin] + text[end:], text[begin:end]


def subsections(section: str) -> dict[str, str]:
    parts = re.split(r"^### ", section, flags=re.M)[1:]
    return {p.split(" ", 1)[0]: p for p in parts}


def row(section: str, first_cell: str) -> str:
    return next(line for line in section.splitlines() if line.startswith(f"| {first_cell} |"))


def test_render_quick_results(quick_runs, tmp_path):
    """render.py --quick on the quick runs: the hand-written BENCHMARKS.md is kept byte for
    byte, one subsection per JSON with its figures, the same file when rendered again, and a
    JSON without a key it should have only spoils its own subsection."""
    results_dir, results = quick_runs
    original = (REPO / "BENCHMARKS.md").read_text()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(original)
    first = render_into(doc, results_dir)
    outside, section = split_section(first)
    assert section and outside == split_section(original)[0]
    assert "## Latest run (make bench)" in section and "quick runs, tiny models" in section
    parts = subsections(section)
    assert sorted(parts) == sorted(Path(s).stem for s, _ in RUNS.values())
    assert "Not rendered" not in section
    hf = results["weight_sync"]["hf"]
    median = hf["sync_seconds"]["shared_memory"]["median"]
    assert f"| {median:.3f} |" in row(parts["weight_sync"], "shared_memory (hf workers)")
    s_step = results["onpolicy"]["cases"]["raykd_lm"]["s_per_step"]["mean"]
    assert row(parts["onpolicy_step"], "raykd_lm").startswith(f"| raykd_lm | {s_step:.2f} |")
    wall = results["learner_step"]["cases"]["actor"]["wall_per_call"]["mean"]
    assert row(parts["learner_step"], "actor").startswith(f"| actor | {wall:.2f} |")
    assert render_into(doc, results_dir) == first  # idempotent

    broken = tmp_path / "broken"
    shutil.copytree(results_dir, broken)
    ws = json.loads((broken / "weight_sync_quick.json").read_text())
    del ws["hf"]["plain_copy_seconds"]
    (broken / "weight_sync_quick.json").write_text(json.dumps(ws))
    doc.write_text(original)
    outside, section = split_section(render_into(doc, broken))
    assert outside == split_section(original)[0]
    parts = subsections(section)
    assert sorted(parts) == sorted(Path(s).stem for s, _ in RUNS.values())
    assert "key 'plain_copy_seconds' missing" in " ".join(parts["weight_sync"].split())
    assert "| shared_memory (hf workers)" not in parts["weight_sync"]
    assert row(parts["onpolicy_step"], "raykd_lm").startswith(f"| raykd_lm | {s_step:.2f} |")
    assert sum("Not rendered" in p for p in parts.values()) == 1
