"""Weight sync without Ray or vLLM: bucket packing, the stateless gloo group protocol between
real processes, CUDA IPC handle routing, update bookkeeping, the vLLM backend's settings and
the config rules that pair sampler backends with sync strategies."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from raykd.config import ConfigError, load_config
from raykd.roles import tensor_transport as tt
from raykd.roles.backends import merged_runtime_env, sampler_class, scorer_class
from raykd.roles.weight_sync import STRATEGIES, make_strategy, named_buckets


def _mixed():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(3, 5, generator=g)),
        ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),  # 14 bytes: misaligns
        ("c.steps", torch.arange(5)),
        ("d.half", torch.randn(2, 3, generator=g).half()),
        ("e.scalar", torch.tensor(2.5)),
        ("f.empty", torch.zeros(0, 4)),
        ("g.strided", torch.randn(4, 6, generator=g).t()),  # non-contiguous
    ]


def test_pack_unpack_round_trip_keeps_dtype_shape_and_alignment():
    tensors = _mixed()
    buf, layout = tt.pack_bucket(tensors)
    assert buf.dtype == torch.uint8 and buf.numel() == tt.layout_bytes(layout)
    assert all(offset % tt.ALIGN == 0 for _, _, _, offset, _ in layout)
    for (name, want), (got_name, got) in zip(tensors, tt.unpack_bucket(buf, layout)):
        assert got_name == name and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert tt.unpack_bucket(*tt.pack_bucket([])) == []
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        tt.unpack_bucket(buf, [["x", "float99", [1], 0, 4]])


def _read_shared(path, nbytes, layout, start, queue):
    """Another process: map the file, then report what it sees after each write."""
    views = tt.unpack_bucket(tt.map_shared_buffer(path, nbytes), layout)
    start.put("mapped")
    for _ in range(2):
        queue.put([(n, t.clone()) for n, t in views])
        start.get(timeout=60)


def test_shared_file_mapping_shows_every_write_to_another_process(tmp_path):
    """A buffer made by create_shared_buffer and mapped by a second process: each write by
    the first (pack_into) is what the second reads, with no message but "look now", even after
    the file's name is gone; the file is private (0600) and never silently reused."""
    import os
    import stat

    tensors = _mixed()
    layout, total = tt.bucket_layout(tensors)
    path = str(tmp_path / "weights")
    buf = tt.create_shared_buffer(path, total)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.stat(path).st_size == total
    with pytest.raises(FileExistsError):
        tt.create_shared_buffer(path, total)
    with pytest.raises(ValueError, match="holds"):
        tt.map_shared_buffer(path, total + 16)
    assert tt.pack_into(buf, tensors, layout) == sum(t.numel() * t.element_size()
                                                     for _, t in tensors)  # fmt: skip
    ctx = mp.get_context("spawn")
    start, queue = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_read_shared, args=(path, total, layout, start, queue))
    proc.start()
    try:
        assert start.get(timeout=60) == "mapped"
        os.unlink(path)  # the mappings outlive the name
        for round_ in range(2):
            sent = [(n, t * 3 + round_ if t.is_floating_point() else t) for n, t in tensors]
            if round_:
                tt.pack_into(buf, sent, layout)
                start.put("go")
            got = queue.get(timeout=60)
            want = tensors if round_ == 0 else sent
            assert [n for n, _ in got] == [n for n, _ in want]
            for (_, g), (_, w) in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g, w.contiguous())
        start.put("done")
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def test_stale_shared_files_of_dead_makers_are_removed(tmp_path):
    """A learner killed between making its file and removing the name leaves it behind; the
    next one removes it, and leaves the files of live processes and foreign names alone."""
    import os

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for name in (f"raykd-weights-{dead}-ab12", f"raykd-weights-{os.getpid()}-cd34",
                 "raykd-weights-x-1", "other-123-4"):  # fmt: skip
        (tmp_path / name).write_bytes(b"w")
    removed = tt.remove_stale_shared_files(str(tmp_path), "raykd-weights-")
    assert removed == [str(tmp_path / f"raykd-weights-{dead}-ab12")]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"raykd-weights-{os.getpid()}-cd34", "raykd-weights-x-1", "other-123-4"])  # fmt: skip
    assert tt.remove_stale_shared_files(str(tmp_path / "missing"), "raykd-weights-") == []


def test_pack_into_refuses_tensors_the_layout_does_not_describe():
    tensors = _mixed()[:2]
    layout, total = tt.bucket_layout(tensors)
    buf = torch.empty(total, dtype=torch.uint8)
    with pytest.raises(ValueError, match="layout has 2 tensors, 1 given"):
        tt.pack_into(buf, tensors[:1], layout)
    other = [tensors[0], ("b.bias", torch.zeros(8, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match=r"'b.bias' torch.bfloat16 \[8\] does not match"):
        tt.pack_into(buf, other, layout)


def _receiver(port, rank, world, rounds, queue):
    group = tt.stateless_group("127.0.0.1", port, rank, world, "gloo", timeout_s=60)
    for _ in range(rounds):
        got = [(n, t.clone()) for bucket in tt.receive_buckets(group, "cpu") for n, t in bucket]
        queue.put(got)


def test_gloo_group_broadcasts_every_bucket_to_every_receiver_twice():
    """Rank 0 (the learner's role) sends; two receivers (engine workers) get every tensor
    exactly, in order; the group is reused for a second update."""
    from raykd.roles.runtime import free_port

    ctx = mp.get_context("spawn")
    port, world = free_port(), 3
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, r, world, 2, queue)) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        group = tt.stateless_group("127.0.0.1", port, 0, world, "gloo", timeout_s=60)
        tensors = _mixed()
        for round_ in range(2):
            sent = [(n, t + round_ if t.is_floating_point() else t) for n, t in tensors]
            buckets = list(named_buckets(sent, bucket_bytes=64))
            stats = tt.send_buckets(group, buckets, "cpu")
            assert stats["buckets"] == len(buckets) > 2 and stats["tensors"] == len(sent)
            for _ in range(2):
                got = queue.get(timeout=60)
                assert [n for n, _ in got] == [n for n, _ in sent]
                for (_, want), (_, have) in zip(sent, got):
                    assert have.dtype == want.dtype and torch.equal(have, want)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)


def test_group_backend_names_and_unknown_backend():
    assert tt.group_backend("cpu") == "gloo" and tt.group_backend("cuda:1") == "nccl"
    with pytest.raises(ValueError, match="gloo or nccl"):
        tt.stateless_group("127.0.0.1", 1, 0, 1, "mpi", timeout_s=1)


def test_ipc_handles_are_retargeted_at_the_receivers_device_and_refuse_other_gpus():
    args = ("cls", (4,), (1,), 0, "storage", torch.float32, 3, b"handle", 0, 0, b"ev", False)
    handle = {"GPU-aaa": args}
    got = tt.ipc_rebuild_args(handle, "GPU-aaa", device_index=0)
    assert got[tt.IPC_DEVICE_ARG] == 0 and got[:6] == args[:6] and got[7:] == args[7:]
    with pytest.raises(ValueError, match="colocated"):
        tt.ipc_rebuild_args(handle, "GPU-bbb", device_index=0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        tt.export_ipc(torch.zeros(4))


def test_strategies_are_registered_and_bucket_size_checked():
    assert set(STRATEGIES) == {"shared_memory", "object_store", "torch_group", "cuda_ipc"}
    assert make_strategy("torch_group", 2.0).bucket_bytes == 2 * 2**20
    assert make_strategy("shared_memory", 1.0, shm_dir="/tmp/x").shm_dir == "/tmp/x"
    with pytest.raises(ValueError, match="> 0 MiB"):
        make_strategy("cuda_ipc", 0)
    with pytest.raises(ValueError, match="valid: cuda_ipc, object_store, shared_memory, torch"):
        make_strategy("nccl", 1)


# ---- the vLLM backend, as far as it goes without vLLM --------------------------------------
def test_vllm_backend_imports_without_vllm_and_declares_what_it_takes():
    code = (
        "import sys; from raykd.roles.backends import sampler_class, scorer_class;"
        "s = sampler_class('vllm'); t = scorer_class('vllm');"
        "import raykd.roles.vllm.extension;"
        "assert 'vllm' not in sys.modules, 'vllm imported';"
        "print(s.__name__, t.__name__, s.capabilities.weight_sync)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "VLLMRolloutWorker VLLMTeacherScorer" in out.stdout
    caps = sampler_class("vllm").capabilities
    assert not caps.teacher_mixing and "torch_group" in caps.weight_sync
    assert sampler_class("hf").capabilities.weight_sync == ("shared_memory", "object_store")


def test_vllm_actor_settings_and_runtime_env(monkeypatch, tmp_path):
    from raykd.roles.vllm import engine as eng

    cfg = load_config(None, ["rollout.backend=vllm", "rollout.vllm.kv_cache_gb=2",
                             "teacher.backend=vllm", "teacher.top_k=48"])  # fmt: skip
    cls = sampler_class("vllm")
    kwargs = cls.config_kwargs(cfg.rollout)["engine"]
    assert kwargs["kv_cache_gb"] == 2 and kwargs["prefix_caching"] and kwargs["enforce_eager"]
    assert scorer_class("vllm").config_kwargs(cfg.teacher)["engine"]["max_logprobs"] == 48
    assert sampler_class("hf").config_kwargs(cfg.rollout) == {}
    monkeypatch.delenv("RAYKD_VLLM_PYTHON", raising=False)
    env = cls.runtime_env(cfg.rollout, {"env_vars": {"OMP_NUM_THREADS": "3"}, "pip": ["x"]})
    assert env["py_executable"].endswith(".venv-vllm/bin/python") and env["pip"] == ["x"]
    assert env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["env_vars"]["OMP_NUM_THREADS"] == "3"  # the config's own env vars win
    monkeypatch.setenv("RAYKD_VLLM_PYTHON", str(tmp_path / "py"))
    assert cls.runtime_env(cfg.rollout)["py_executable"] == str(tmp_path / "py")
    assert "make install-vllm" in eng.venv_problem()
    with pytest.raises(ValueError, match="unknown vLLM engine settings"):
        eng.settings_of({"vllm": {"kv_cache": 1}})
    assert merged_runtime_env({"a": 1, "env_vars": {"X": "1"}}, None) == {
        "a": 1,
        "env_vars": {"X": "1"},
    }


def test_update_tracker_wants_every_weight_once_and_nothing_unknown():
    from raykd.roles.vllm.sampler import UpdateTracker, request_seed

    tracker = UpdateTracker({"a", "b", "lm_head.weight"}, tied=True)
    tracker.add(["a"])
    with pytest.raises(RuntimeError, match="unexpected tensor 'lm_head.weight'"):
        tracker.add(["lm_head.weight"])
    with pytest.raises(RuntimeError, match=r"missing tensors \['b'\]"):
        tracker.finish()
    tracker.add(["a", "b"])
    tracker.finish()  # complete; and the next update starts from nothing
    with pytest.raises(RuntimeError, match="missing"):
        tracker.finish()
    seeds = {request_seed(s, r) for s in range(20) for r in range(20)}
    assert len(seeds) == 400


def test_topk_of_a_prompt_logprobs_entry_keeps_the_top_k_by_rank():
    from raykd.roles.vllm.scorer import topk_of

    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731
    entry = {7: lp(-0.1, 1), 3: lp(-2.0, 3), 9: lp(-1.0, 2), 42: lp(-9.0, 811)}  # 42: given token
    assert topk_of(entry, 3) == ([-0.1, -1.0, -2.0], [7, 9, 3])
    assert topk_of(entry, 2) == ([-0.1, -1.0], [7, 9])


# ---- config: sampler backends and sync strategies go together --------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["rollout.weight_sync=torch_group"],
            "rollout.backend=hf takes ['auto', 'shared_memory', 'object_store']",
        ),
        (["rollout.backend=vllm", "rollout.weight_sync=shared_memory"], "backend=vllm takes"),
        # auto is object_store for vLLM, which needs the in-process engine
        (["rollout.backend=vllm", "rollout.vllm.multiprocessing=true"], "in-process vLLM"),
        (["rollout.backend=vllm", "rollout.vllm.multiprocessing=true"], "in-process vLLM"),
        (["rollout.backend=vllm", "reverse_kl.mix_alpha=0.2"], "holds the teacher"),
        (["rollout.vllm.kv_cache_gb=0"], "rollout.vllm.kv_cache_gb"),
        (["teacher.vllm.gpu_memory_utilization=1.5"], "teacher.vllm.gpu_memory_utilization"),
        (["teacher.backend=vllm", "teacher.vllm.max_logprobs=8"], ">= teacher.top_k"),
        (["rollout.weight_sync=carrier_pigeon"], "weight sync strategy"),
    ],
)
def test_config_pairs_backends_with_strategies(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_auto_weight_sync_is_the_backends_first_choice():
    from raykd.roles.backends import weight_sync_name

    assert weight_sync_name(load_config(None, []).rollout) == "shared_memory"
    assert weight_sync_name(load_config(None, ["rollout.backend=vllm"]).rollout) == "object_store"
    rc = load_config(None, ["rollout.weight_sync=object_store"]).rollout
    assert weight_sync_name(rc) == "object_store"


def test_vllm_configs_that_work_load():
    for sync in ("object_store", "torch_group", "cuda_ipc"):
        cfg = load_config(None, ["rollout.backend=vllm", f"rollout.weight_sync={sync}"])
        assert cfg.rollout.weight_sync == sync
    load_config(None, ["rollout.backend=vllm", "rollout.vllm.multiprocessing=true",
                       "rollout.weight_sync=torch_group", "teacher.backend=vllm"])  # fmt: skip
