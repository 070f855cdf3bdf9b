"""Weight sync sends each storage once and a sampler may borrow the store's buffers: tied
weights dropped by identity (not by name), distinct views kept; a borrowed bucket becomes the
sampler's weights without a copy, a mismatched one is copied."""

from __future__ import annotations

import torch

from raykd.models import build_tiny_model, build_tiny_tokenizer, save_model
from raykd.roles.rollout import HFRolloutWorker
from raykd.roles.weight_sync import distinct_tensors


def test_distinct_tensors_drops_tied_aliases_only():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0, num_layers=2, hidden_size=32)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    names = [n for n, _ in distinct_tensors(sd.items())]
    assert "lm_head.weight" not in names and len(names) == len(sd) - 1
    base = torch.arange(12.0)
    views = [("a", base), ("b", base.view(3, 4)), ("c", base[:6]), ("a2", base),
             ("e1", torch.empty(0)), ("e2", torch.empty(0))]  # fmt: skip
    # same memory, other shape or length: kept; the very same view: dropped; empties: kept
    assert [n for n, _ in distinct_tensors(views)] == ["a", "b", "c", "e1", "e2"]


def test_borrowed_bucket_becomes_the_weights(tmp_path):
    tok = build_tiny_tokenizer()
    save_model(build_tiny_model(tok, seed=0, num_layers=2, hidden_size=32), tok, tmp_path / "m")
    worker = HFRolloutWorker(str(tmp_path / "m"), num_threads=1)
    other = build_tiny_model(tok, seed=1, num_layers=2, hidden_size=32)
    named = [(k, v.detach().clone()) for k, v in distinct_tensors(other.state_dict().items())]
    half = len(named) // 2
    assert worker.update_weights(named[:half], finished=False, borrow=True) == half
    assert worker.update_weights(named[half:], finished=True, borrow=True) == len(named) - half
    params = dict(worker.model.named_parameters())
    emb = dict(named)["model.embed_tokens.weight"]
    assert params["model.embed_tokens.weight"].data_ptr() == emb.data_ptr()  # no copy
    assert worker.model.lm_head.weight.data_ptr() == emb.data_ptr()  # still tied
    prompt = [[5, 6, 7, 8]]
    got = worker.generate(prompt, max_new_tokens=5, greedy=True).batch.input_ids[0, 4:]
    want = other.generate(torch.tensor(prompt), max_new_tokens=5, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 4:]  # fmt: skip
    assert got.tolist() == want[: len(got)].tolist()
    # another dtype cannot be borrowed: it is copied (converted) into fresh weights, never
    # into the borrowed buffers (read-only when they are the object store's)
    before = emb.clone()
    doubles = [(k, v.double() + 1.0) for k, v in named]
    worker.update_weights(doubles, finished=True, borrow=True)
    w = worker.model.model.embed_tokens.weight
    assert w.dtype == torch.float32 and torch.allclose(w, before + 1.0)
    assert torch.equal(emb, before) and w.data_ptr() != emb.data_ptr()
    assert worker.model.lm_head.weight.data_ptr() == w.data_ptr()
