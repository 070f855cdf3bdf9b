"""Pure helpers of the controller: sharding, deterministic batching, micro-batches, run dir."""

import json

import pytest
import torch

from raykd.algorithms.common import example_stream, mean_metrics, to_micro_batches
from raykd.atomic import atomic_write_json, publish_dir, recover_dir
from raykd.batch import Example, examples_to_batch, pad_sequences, token_logprobs
from raykd.roles.group import shard
from raykd.rundir import RunDir


def test_shard_contiguous_and_balanced():
    assert shard(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard([1], 2) == [[1], []]
    assert sum(shard(list(range(10)), 4), []) == list(range(10))


def _examples(n):
    return [Example(uid=f"e{i}", prompt_ids=[1, 2], response_ids=[3 + i]) for i in range(n)]


def test_example_stream_covers_each_epoch_and_resumes_identically():
    ex = _examples(10)
    stream = example_stream(ex, 4, seed=3)
    full = [next(stream) for _ in range(6)]
    # 6 steps x 4 = 24 items = 2.4 epochs; the first 10 items are a permutation (epoch 0)
    first_epoch = [e.uid for _, b in full for e in b][:10]
    assert sorted(first_epoch) == sorted(e.uid for e in ex)
    resumed = example_stream(ex, 4, seed=3, start_step=3)
    for step, batch in full[3:]:
        s, b = next(resumed)
        assert s == step and [e.uid for e in b] == [e.uid for e in batch]
    other = next(example_stream(ex, 4, seed=4))[1]
    assert [e.uid for e in other] != [e.uid for e in full[0][1]]


def test_loss_mask_only_on_response_and_padding():
    ex = [
        Example("a", [5, 6, 7], [8, 9]),
        Example("b", [5], [8, 9, 10, 11]),
    ]
    b = examples_to_batch(ex, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 11]]
    assert b.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    short = pad_sequences([[1, 2], [3]], [[0, 1], [0]], pad_id=9)
    assert short.input_ids.tolist() == [[1, 2], [3, 9]]
    assert short.attention_mask.tolist() == [[1, 1], [1, 0]]


def test_micro_batches_split_by_rank_and_trim_padding():
    ids = torch.arange(4 * 6).view(4, 6)
    attn = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2])
    lm_attn = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    t = {"input_ids": ids, "attention_mask": attn, "lm_attention_mask": lm_attn}
    shards = to_micro_batches(t, world=2, grad_accum=2)
    assert len(shards) == 2 and all(len(s) == 2 for s in shards)
    assert shards[0][0]["input_ids"].tolist() == [ids[0].tolist()]
    assert shards[0][1]["input_ids"].shape == (1, 3)  # row 1 trimmed to its 3 tokens
    assert shards[1][0]["input_ids"].shape == (1, 2)
    assert shards[0][1]["lm_attention_mask"].shape == (1, 2)  # lm_* follow their own mask


def test_token_logprobs_matches_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5))
    got = token_logprobs(logits, ids, chunk=2)
    ref = torch.zeros(2, 5, dtype=torch.float64)
    for b in range(2):
        for t in range(1, 5):
            row = logits[b, t - 1]
            ref[b, t] = row[ids[b, t]] - torch.log(torch.exp(row).sum())
    assert torch.allclose(got, ref, atol=1e-12)


def test_mean_metrics():
    assert mean_metrics([{"loss": 1.0}, {"loss": 3.0}]) == {"loss": 2.0}


def test_rundir_atomic_writes_and_dir_replace(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.log("s", 1, {"loss": 2.5})
    with open(rd.path("metrics.jsonl"), "a") as fh:
        fh.write('{"stage": "s", "step": 2, "lo')  # a line cut by a kill
    assert [r["loss"] for r in rd.read_metrics("s")] == [2.5]
    # the resumed run (a new RunDir on the same directory) never glues onto the cut line, and
    # a step it trains again supersedes the killed run's row for that step
    rd = RunDir(tmp_path / "run")
    rd.log("s", 1, {"loss": 2.0})
    rd.log("s", 2, {"loss": 1.5})
    assert [(r["step"], r["loss"]) for r in rd.read_metrics("s")] == [(1, 2.0), (2, 1.5)]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    rd.mark_done("stage", {"a": 1})
    assert rd.stage_done("stage") == {"a": 1} and rd.stage_done("other") is None
    atomic_write_json(tmp_path / "x.json", {"v": torch.tensor(1.5)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1.5}
    assert not list(tmp_path.glob(".*tmp"))

    target = tmp_path / "model"
    for version in ("v1", "v2"):
        tmp = tmp_path / "model.tmp"
        tmp.mkdir()
        (tmp / "w").write_text(version)
        publish_dir(tmp, target)
    assert (target / "w").read_text() == "v2"
    # crash between the two renames: only model.old exists -> recovered
    target.rename(tmp_path / "model.old")
    recover_dir(target)
    assert (target / "w").read_text() == "v2"


def test_example_stream_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        next(example_stream([], 2, 0))


def test_scatter_topk_places_rows_at_response_positions_and_names_mismatches():
    import math

    import pytest
    import torch

    from raykd.batch import scatter_topk

    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.float32)
    a = (torch.tensor([[-0.1, -2.0], [-0.3, -1.5]]), torch.tensor([[5, 7], [9, 2]]))
    b = (torch.tensor([[-0.2, -1.7]]), torch.tensor([[4, 3]]))
    lp, idx = scatter_topk([a, b], mask, 2)
    assert lp.shape == idx.shape == (2, 4, 2)
    torch.testing.assert_close(lp[0, 1:3], a[0])
    torch.testing.assert_close(idx[1, 2], b[1][0])
    # off-mask positions: a valid filler distribution (mass 2 * 0.5/2 = 0.5 <= 1)
    assert torch.all(lp[0, 0] == math.log(0.25)) and idx[0, 3].tolist() == [0, 1]
    with pytest.raises(ValueError, match="example ex-b: 1 response positions but 2"):
        scatter_topk([a, a], mask, 2, ["ex-a", "ex-b"])
