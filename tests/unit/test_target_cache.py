"""The teacher-target cache: keyed by teacher, k, temperature and tokens; scattered densely."""

import pytest
import torch

from raykd.batch import Example, examples_to_batch
from raykd.roles.target_cache import TopKCache


def _teacher_dir(tmp_path, content="{}"):
    d = tmp_path / "teacher"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(content)
    return str(d)


def test_put_get_and_dense_scatter(tmp_path):
    cache = TopKCache(tmp_path / "c", _teacher_dir(tmp_path), k=2, temperature=1.0)
    ex = [Example("a", [5, 6], [7, 8]), Example("b", [5], [9])]
    assert cache.get(ex[0]) is None
    cache.put(ex[0], torch.tensor([[-0.1, -2.0], [-0.5, -1.0]]), torch.tensor([[7, 1], [8, 2]]))
    cache.put(ex[1], torch.tensor([[-0.2, -3.0]]), torch.tensor([[9, 4]]))
    lp, idx = cache.get(ex[0])
    assert idx.tolist() == [[7, 1], [8, 2]]

    batch = examples_to_batch(ex, pad_id=0)
    dense_lp, dense_idx = cache.dense(ex, batch.loss_mask)
    assert dense_lp.shape == (2, 4, 2)
    # targets sit exactly on the response positions (mask 1), in order
    assert dense_idx[0, 2].tolist() == [7, 1] and dense_idx[0, 3].tolist() == [8, 2]
    assert dense_idx[1, 1].tolist() == [9, 4]
    assert dense_lp[0, 3].tolist() == pytest.approx([-0.5, -1.0])
    # off-target filler is a valid sub-distribution (tail mass 1/2), so no NaN downstream
    assert dense_lp[0, 0].exp().sum().item() == pytest.approx(0.5)


def test_key_separates_temperature_k_and_teacher(tmp_path):
    t = _teacher_dir(tmp_path)
    a = TopKCache(tmp_path / "c", t, k=2, temperature=1.0)
    ex = Example("a", [1], [2])
    a.put(ex, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int32))
    assert TopKCache(tmp_path / "c", t, k=2, temperature=1.0).get(ex) is not None
    assert TopKCache(tmp_path / "c", t, k=2, temperature=2.0).get(ex) is None
    assert TopKCache(tmp_path / "c", t, k=4, temperature=1.0).get(ex) is None
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert TopKCache(tmp_path / "c", str(other), k=2, temperature=1.0).get(ex) is None
    # the same uid with other tokens is another example
    assert a.get(Example("a", [1], [3])) is None


def test_dense_rejects_missing_or_mismatched_targets(tmp_path):
    cache = TopKCache(tmp_path / "c", _teacher_dir(tmp_path), k=2, temperature=1.0)
    ex = [Example("a", [5], [7, 8])]
    batch = examples_to_batch(ex, pad_id=0)
    with pytest.raises(KeyError, match="example a"):
        cache.dense(ex, batch.loss_mask)
    cache.put(ex[0], torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="example a: 2 response positions but 1 target rows"):
        cache.dense(ex, batch.loss_mask)
