"""Rollout role: sample (or greedily decode) continuations of prompts with the student.

This is the ``hf`` backend of :class:`raykd.roles.backends.Sampler` (transformers ``generate``;
CPU and GPU). The weights are refreshed from the learner in ``(name, tensor)`` buckets through
:meth:`HFRolloutWorker.update_weights` (see :mod:`raykd.roles.weight_sync`).

With ``mix_teacher`` the worker also holds the frozen teacher and can sample from MiniLLM's
mixture ``α·p_T + (1−α)·q_S`` (:mod:`raykd.roles.mixture`); such rollouts carry the
teacher's log-prob of every sampled token as well.
"""

from __future__ import annotations

import torch

from raykd.batch import Rollout, pad_rows, pad_sequences
from raykd.roles.backends import Sampler, SamplerCapabilities
from raykd.roles.mixture import sample_from_mixture


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


class HFRolloutWorker(Sampler):
    """Holds a copy of the policy being trained (or any model to decode from)."""

    capabilities = SamplerCapabilities(
        teacher_mixing=True, weight_sync=("shared_memory", "object_store"), exact_logprobs=True
    )

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        num_threads: int | None = None,
        mix_teacher: str | None = None,
    ):
        from raykd.models import load_model, load_tokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype=dtype).to(self.device).eval()
        self.teacher = None
        if mix_teacher:
            self.teacher = load_model(mix_teacher, dtype=dtype).to(self.device).eval()
        self._params = dict(self.model.state_dict(keep_vars=True))
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        self._tied = {"lm_head.weight"} if tied else set()
        self._updated: set[str] = set()
        self._borrowed: set[int] = set()  # weights that are borrowed (read-only) buffers
        self._shared: list | None = None  # views into the learner's shared weight file
        self.stop_ids = _stop_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.stop_ids[0]

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def update_weights(self, named_tensors, finished: bool = True, borrow: bool = False) -> int:
        """Load one bucket of new weights into the model. Tensors arrive read-only from the
        object store: with ``borrow`` a weight of the same dtype and shape on the CPU takes the
        buffer itself (no copy; the model only reads its weights, and keeps the buffer alive
        until the next update), otherwise ``copy_`` reads it. On the last bucket, check that
        every weight was replaced (a tied ``lm_head`` shares the embedding and is sent once)."""
        params = self._params
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise RuntimeError(f"weight sync: unexpected tensor {name!r}")
                param = params[name]
                if (borrow and param.device.type == "cpu" and param.dtype == tensor.dtype
                        and param.shape == tensor.shape and tensor.is_contiguous()):  # fmt: skip
                    param.data = tensor
                    self._borrowed.add(id(param))
                else:
                    if id(param) in self._borrowed:  # never write into a borrowed buffer
                        param.data = torch.empty_like(param.data)
                        self._borrowed.discard(id(param))
                    param.copy_(tensor)
                self._updated.add(name)
        n = len(named_tensors)
        if finished:
            missing = set(params) - self._updated - self._tied
            self._updated = set()
            if missing:
                raise RuntimeError(f"weight sync: missing tensors {sorted(missing)[:5]}")
        return n

    def load_shared_weights(self, region: dict | None = None) -> int | None:
        """Weights from the learner's shared file mapping (``shared_memory`` sync). With
        ``region`` (``{path, layout, bytes, node}``, once per file) map it and borrow its
        views as the weights: from then on the learner's writes into the file are this
        model's new weights with no copy. Without it, apply the mapped views again (a weight
        kept apart, e.g. another dtype, is copied). Returns the tensors loaded, or None when
        this process cannot map the file (another node, the file gone): the caller then
        syncs another way."""
        import os

        import ray

        from raykd.roles.tensor_transport import map_shared_buffer, unpack_bucket

        if region is not None:
            here = ray.get_runtime_context().get_node_id()
            if region["node"] != here or not os.path.exists(region["path"]):
                return None
            buf = map_shared_buffer(region["path"], region["bytes"])
            self._shared = unpack_bucket(buf, region["layout"])
        if self._shared is None:
            raise RuntimeError("load_shared_weights before a shared weight file was mapped")
        return self.update_weights(self._shared, finished=True, borrow=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the current weights on the CPU (to check a sync against the learner's)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        uids: list[str] | None = None,
        mix_alpha: float = 0.0,
    ) -> Rollout:
        """Continue each prompt; returns prompt+response sequences (right-padded), a loss mask
        on the response tokens (up to and including the stop token) and ``log q(y_t)`` of each
        response token under the current weights at temperature 1.

        ``mix_alpha > 0`` samples each token from ``mix_alpha·p_T + (1−mix_alpha)·q`` at
        temperature 1 (needs ``mix_teacher``); the rollout then has ``teacher_logprobs``."""
        torch.manual_seed(seed)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-pad for batched decoding
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        teacher_lp = None
        if mix_alpha > 0:
            if self.teacher is None:
                raise ValueError("mix_alpha > 0 needs a RolloutWorker built with mix_teacher")
            if greedy or temperature != 1.0 or top_p != 1.0:
                raise ValueError(
                    "teacher-mixed sampling draws from the mixture at temperature 1: "
                    f"got greedy={greedy}, temperature={temperature}, top_p={top_p}"
                )
            gen, gen_lp, teacher_lp = sample_from_mixture(
                self.model, self.teacher, ids, attn, alpha=mix_alpha,
                max_new_tokens=max_new_tokens, stop_ids=self.stop_ids, pad_id=self.pad_id,
            )  # fmt: skip
            gen, gen_lp, teacher_lp = gen.cpu(), gen_lp.cpu(), teacher_lp.cpu()
        else:
            gen, gen_lp = self._generate(ids, attn, max_new_tokens, greedy, temperature, top_p)
        seqs, masks, lps, tlps, texts, stopped = [], [], [], [], [], []
        for i, p in enumerate(prompts):
            resp = gen[i].tolist()
            n = len(resp)
            for j, t in enumerate(resp):
                if t in self.stop_ids:
                    n = j + 1
                    break
            resp = resp[:n]
            stopped.append(bool(resp) and resp[-1] in self.stop_ids)
            seqs.append(list(p) + resp)
            masks.append([0.0] * len(p) + [1.0] * n)
            lps.append([0.0] * len(p) + gen_lp[i, :n].tolist())
            if teacher_lp is not None:
                tlps.append([0.0] * len(p) + teacher_lp[i, :n].tolist())
            texts.append(self.tokenizer.decode(resp, skip_special_tokens=True))
        batch = pad_sequences(seqs, masks, self.pad_id, uids)
        return Rollout(
            batch,
            pad_rows(lps, batch.loss_mask) * batch.loss_mask,
            [len(p) for p in prompts],
            texts,
            teacher_logprobs=pad_rows(tlps, batch.loss_mask) * batch.loss_mask if tlps else None,
            stopped=stopped,
        )

    def _generate(self, ids, attn, max_new_tokens, greedy, temperature, top_p):
        """``transformers.generate``: response tokens ``[B, N]`` and ``log q(y_j)`` of each."""
        kwargs = dict(do_sample=False)
        if not greedy:
            kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        gen = out.sequences[:, ids.shape[1] :].cpu()
        gen_lp = torch.stack(  # log q(y_j) per step, gathered so no [B, N, V] copy is kept
            [
                torch.log_softmax(lg.float(), -1).gather(-1, gen[:, j : j + 1].to(lg.device))
                for j, lg in enumerate(out.logits)
            ],
            dim=1,
        )
        return gen, gen_lp.squeeze(-1).cpu()


RolloutWorker = HFRolloutWorker  # the default backend under its role name
