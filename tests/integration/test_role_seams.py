"""The seams roles hang on, on a real local Ray node: fan-out with fewer items than actors,
groups inside somebody else's placement group, runtime_env per role, shutdown on every exit
path, bucketed weight sync (the values that cross: learner weights == sampler weights, a tied
lm_head sent once), threads from each actor's own reservation."""

from __future__ import annotations

import os
import sys

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group

from raykd.algorithms.common import scored_logprobs
from raykd.batch import Example, examples_to_batch
from raykd.config import load_config
from raykd.models import load_model
from raykd.roles.factory import SlotPlacement, actor_threads, learner_group, sampler_group
from raykd.roles.group import Placement, RoleGroup
from raykd.roles.teacher import TeacherScorer

pytestmark = pytest.mark.integration
# The test-local actor class below travels by value (workers cannot import this test module).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Echo:
    def __init__(self, rank: int):
        self.rank = rank

    def who(self, x):
        return (self.rank, x)

    def shard(self, items):
        return [(self.rank, i) for i in items]

    def env(self, key):
        return os.environ.get(key)

    def threads(self):
        return torch.get_num_threads()


def _echo(n, **kw):
    return RoleGroup(Echo, n, num_cpus=0.1, make_args=lambda r: ((r,), {}), name="echo", **kw)


def test_fan_out_handles_fewer_items_than_actors_and_keeps_order(ray_node):
    with _echo(3) as g:
        assert g.map("who", ["a"]) == [(0, "a")]
        assert g.map("who", list("abcde")) == [(0, "a"), (1, "b"), (2, "c"), (0, "d"), (1, "e")]
        assert g.map_shards("shard", [10, 11]) == [(0, 10), (1, 11)]  # the third gets nothing
        assert g.map_shards("shard", list(range(5))) == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4)]
        calls = [((i,), {}) for i in range(2)]
        assert g.map_calls("who", calls) == [(0, 0), (1, 1)]
        with pytest.raises(ValueError, match="2 argument tuples for 3 actors"):
            g.call_per_rank("who", [(1,), (2,)])


def test_groups_live_inside_an_external_placement_group_and_runtime_env(ray_node):
    pg = placement_group([{"CPU": 0.2}, {"CPU": 0.2}, {"CPU": 0.2}])
    ray.get(pg.ready(), timeout=120)
    try:
        env = {"env_vars": {"RAYKD_PROBE": "from-runtime-env"}}
        g = _echo(2, placement=Placement(pg, [2, 0]), runtime_env=env)
        assert g.pg is pg
        assert g.call("env", "RAYKD_PROBE") == ["from-runtime-env"] * 2
        table = ray.util.placement_group_table(pg)
        g.shutdown()
        # the group did not remove a placement group it did not create
        assert ray.util.placement_group_table(pg)["state"] == table["state"] == "CREATED"
        with pytest.raises(ValueError, match="2 actors but 1 bundles"):
            _echo(2, placement=Placement(pg, [1]))
    finally:
        remove_placement_group(pg)


def test_context_manager_shuts_down_on_error(ray_node):
    before = len(ray.util.placement_group_table())
    with pytest.raises(RuntimeError, match="boom"):
        with _echo(2) as g:
            actors = list(g.actors)
            raise RuntimeError("boom")
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.who.remote(1), timeout=60)
    states = [t["state"] for t in ray.util.placement_group_table().values()]
    assert len(states) == before + 1 and states[-1] == "REMOVED"


def test_scored_logprobs_with_fewer_rows_than_scorers(ray_node, tiny_teacher):
    """One row, two scorers: the old zip(strict) over dropped empty shards raised here."""
    ex = Example("a", [5, 6, 7], [8, 9, 10])
    batch = examples_to_batch([ex], 0)
    group = RoleGroup(TeacherScorer, 2, num_cpus=0.2,
                      make_args=lambda r: ((tiny_teacher, "float32", 1), {}))  # fmt: skip
    with group:
        got = scored_logprobs(group, batch)
    want = TeacherScorer(tiny_teacher).token_logprobs(batch)
    torch.testing.assert_close(got, want)


def _cfg(tiny_teacher, *over):
    return load_config(None, [f"teacher.model={tiny_teacher}", "rollout.num_workers=2",
                              "rollout.cpus_per_worker=0.2", "learner.cpus_per_rank=0.5",
                              "learner.zero_stage=0", *over])  # fmt: skip


SETUP = dict(zero_stage=0, lr=1e-2, weight_decay=0.0, betas=[0.9, 0.95], warmup_steps=0,
             micro_batch_size=2, grad_accum=1, grad_clip=1.0, seed=0)  # fmt: skip


def test_bucketed_weight_sync_moves_exactly_the_learner_weights(ray_node, tiny_teacher):
    """After a train step the samplers hold the learner's weights bit for bit; a tied lm_head
    is sent once; a small bucket size splits the stream into many buckets."""
    from raykd.algorithms.supervised import sft_loss

    cfg = _cfg(tiny_teacher, "rollout.sync_bucket_mb=0.05", "rollout.weight_sync=object_store")
    learners = learner_group(cfg, tiny_teacher, SETUP)
    samplers = sampler_group(cfg, tiny_teacher)
    try:
        ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
        mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "loss_mask": torch.ones(2, 10)}  # fmt: skip
        learners.train_step([[mb]], sft_loss)
        stats = learners.sync_weights(samplers)
        want = learners.call("state_dict")[0]
        tied = "lm_head.weight" in want and torch.equal(
            want["lm_head.weight"], want["model.embed_tokens.weight"]
        )
        assert stats["sync_buckets"] > 3
        assert stats["sync_tensors"] == len(want) - (1 if tied else 0)
        # the sampler's greedy decode equals one of a local model with the learner's weights

        local = load_model(tiny_teacher)
        local.load_state_dict(want)
        prompt = [[5, 6, 7, 8]]
        got = samplers.call("generate", prompt, max_new_tokens=6, greedy=True)
        out = local.generate(torch.tensor(prompt), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)  # fmt: skip
        for r in got:
            assert (
                r.batch.input_ids[0, 4:].tolist()
                == out[0, 4:].tolist()[: r.batch.input_ids.shape[1] - 4]
            )
        # and the update changed something the un-synced sampler did not have
        fresh = load_model(tiny_teacher).state_dict()
        assert any(not torch.equal(fresh[k], want[k]) for k in want)
    finally:
        learners.shutdown()
        samplers.shutdown()


def _train(learners, seed):
    from raykd.algorithms.supervised import sft_loss

    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(seed))
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones(2, 10)}
    learners.train_step([[mb]], sft_loss)


def _shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("raykd-weights-")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_memory_sync_gives_every_sampler_the_learner_weights_at_each_step(
    ray_node, tiny_teacher, dtype
):
    """The default hf sync (auto -> shared_memory): after each of two train steps + syncs,
    every sampler's weights are the learner's exactly (float32: the mapped file itself;
    bfloat16: copies of it). The second step is the one a sync that only maps the file once
    and never writes it again would get wrong. No weight file is left in /dev/shm."""
    cfg = _cfg(tiny_teacher, f"rollout.dtype={dtype}")
    learners = learner_group(cfg, tiny_teacher, SETUP)
    samplers = sampler_group(cfg, tiny_teacher)
    before = _shm_files()
    try:
        assert learners.weight_sync.name == "shared_memory"
        for step in range(2):
            _train(learners, seed=step)
            stats = learners.sync_weights(samplers)
            assert stats["sync_fallback"] == 0.0
            want = learners.call("state_dict")[0]
            for got in samplers.call("state_dict"):
                assert set(got) == set(want)
                for k, w in want.items():
                    assert torch.equal(got[k], w.to(got[k].dtype)), (step, k)
            assert _shm_files() == before  # the name went as soon as both had mapped it
        fresh = load_model(tiny_teacher).state_dict()
        assert any(not torch.equal(fresh[k], want[k]) for k in want)
    finally:
        learners.shutdown()
        samplers.shutdown()


def test_shared_memory_sync_falls_back_to_the_object_store_when_it_cannot_map(
    ray_node, tiny_teacher, caplog
):
    """No room for the file (here: no such directory): a warning with the reason, then the
    object store, with the same weights arriving."""
    cfg = _cfg(tiny_teacher, "rollout.shm_dir=/nonexistent/raykd", "rollout.num_workers=1")
    learners = learner_group(cfg, tiny_teacher, SETUP)
    samplers = sampler_group(cfg, tiny_teacher)
    try:
        _train(learners, seed=3)
        with caplog.at_level("WARNING", logger="raykd.roles.weight_sync"):
            stats = learners.sync_weights(samplers)
        assert stats["sync_fallback"] == 1.0 and "sync_buckets" in stats
        assert "cannot make" in caplog.text and "/nonexistent/raykd" in caplog.text
        assert "object store" in caplog.text
        want = learners.call("state_dict")[0]
        got = samplers.call("state_dict")[0]
        assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        learners.shutdown()
        samplers.shutdown()


def test_threads_come_from_the_actors_own_reservation(ray_node, tiny_teacher):
    assert actor_threads(0.5) == 1 and actor_threads(2.0) == 2 and actor_threads(0.5, 3) == 3
    with _echo(1) as g:  # the default: its own 0.1 CPU -> Ray sets 1 thread
        assert g.call("threads") == [1]
    cfg = _cfg(tiny_teacher, "rollout.num_threads=2", "rollout.num_workers=1")
    with sampler_group(cfg, tiny_teacher) as samplers:
        assert samplers.call("torch_threads") == [2]


def test_slot_placement_puts_each_role_in_its_bundles(ray_node, tiny_teacher):
    pg = placement_group([{"CPU": 0.1}, {"CPU": 0.2}, {"CPU": 0.2}])
    ray.get(pg.ready(), timeout=120)
    try:
        slots = SlotPlacement(pg, {"rollout": [1, 2]})
        cfg = _cfg(tiny_teacher)
        with sampler_group(cfg, tiny_teacher, placement=slots) as samplers:
            assert samplers.pg is pg and len(samplers) == 2
        with pytest.raises(ValueError, match="0 bundles for role 'learner'"):
            slots.take("learner", 1)
    finally:
        remove_placement_group(pg)


def test_the_embedded_node_listens_on_loopback_only(ray_node, tiny_teacher):
    """Every socket the node's processes (gcs, raylet, workers, agents) and a learner group's
    rendezvous listen on is a loopback address, while actors are alive."""
    import psutil

    cfg = _cfg(tiny_teacher)
    learners = learner_group(cfg, tiny_teacher, SETUP)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        me = psutil.Process()
        listening = set()
        for proc in [me, *me.children(recursive=True)]:
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.Error:
                continue
            listening |= {(proc.name(), c.laddr.ip) for c in conns
                          if c.status == psutil.CONN_LISTEN}  # fmt: skip
        assert len(listening) >= 3, listening
        exposed = {(n, ip) for n, ip in listening
                   if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}  # fmt: skip
        assert not exposed, exposed
    finally:
        learners.shutdown()


def test_an_infeasible_role_fails_in_seconds_naming_what_it_asked(ray_node):
    import time

    t0 = time.time()
    with pytest.raises(ValueError, match=r"role 'echo' asks for 1 x \{'CPU': 4.0\}.*'CPU': 2.0"):
        RoleGroup(Echo, 1, num_cpus=4.0, make_args=lambda r: ((r,), {}), name="echo")
    with pytest.raises(ValueError, match="GPU"):
        RoleGroup(Echo, 1, num_cpus=0.1, num_gpus=1, make_args=lambda r: ((r,), {}), name="echo")
    assert time.time() - t0 < 30
