"""``rollout.backend: vllm`` — a rollout worker running a vLLM engine.

Returns exactly what the ``hf`` sampler (:class:`raykd.roles.rollout.HFRolloutWorker`) does:
prompt + response rows (right-padded), a loss mask on the response tokens up to and including
the stop token, the response texts, and ``log q(y_t)`` of every response token at temperature
1 under the current weights (vLLM's default ``logprobs_mode="raw_logprobs"``: the model's
log-softmax before temperature / top-p). Each row is its own request with its own seed, so
repeated prompts (GRPO groups, ``n > 1``) are independent draws that share their prompt's
KV cache through prefix caching.

New weights arrive in ``(name, tensor)`` buckets (:meth:`update_weights`, object store), over
a torch process group (:meth:`join_weight_group` / :meth:`receive_weights`) or by CUDA IPC
(:meth:`load_ipc_weights`); every path ends with a reset of the prefix cache, whose entries
were computed with the old weights. Teacher-mixed sampling is not offered (use ``hf``).
"""

from __future__ import annotations

import glob
import os

import torch

from raykd.batch import Rollout, pad_rows, pad_sequences
from raykd.roles.backends import Sampler, SamplerCapabilities
from raykd.roles.rollout import _stop_ids  # the hf sampler's stop set, so both stop alike
from raykd.roles.vllm import engine as eng


def checkpoint_names(model_path: str) -> set[str]:
    """Tensor names in a model directory's safetensors files (what a full update replaces)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(glob.glob(os.path.join(model_path, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    return names


def request_seed(seed: int, row: int) -> int:
    """A distinct per-request seed for row ``row`` of a call seeded ``seed``."""
    return (int(seed) * 1_000_003 + row) % (2**63 - 1)


class UpdateTracker:
    """Checks a weight update the way the ``hf`` sampler does: every expected tensor replaced
    once (a tied ``lm_head`` is not sent), nothing unknown. With no expected names (a model
    directory without safetensors) nothing is checked."""

    def __init__(self, expected: set[str], tied: bool):
        self.expected = set(expected) - ({"lm_head.weight"} if tied else set())
        self.seen: set[str] = set()

    def add(self, names) -> None:
        if not self.expected:
            return
        unknown = [n for n in names if n not in self.expected]
        if unknown:
            raise RuntimeError(f"weight sync: unexpected tensor {unknown[0]!r}")
        self.seen.update(names)

    def finish(self) -> None:
        missing, self.seen = self.expected - self.seen, set()
        if missing:
            raise RuntimeError(f"weight sync: missing tensors {sorted(missing)[:5]}")


class VLLMRolloutWorker(Sampler):
    """One vLLM engine (in-process ``LLM``) holding the policy."""

    capabilities = SamplerCapabilities(
        teacher_mixing=False, weight_sync=("object_store", "torch_group", "cuda_ipc")
    )

    @classmethod
    def config_kwargs(cls, section) -> dict:
        return {"engine": eng.settings_of(section)}

    @classmethod
    def runtime_env(cls, section, given: dict | None = None) -> dict:
        return eng.actor_runtime_env(section, given)

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        num_threads: int | None = None,
        mix_teacher: str | None = None,
        engine: dict | None = None,
    ):
        if mix_teacher:
            raise ValueError("the vllm sampler cannot sample a teacher-student mixture")
        self.settings = {**eng.DEFAULTS, **(engine or {})}
        self.llm = eng.build_engine(model_path, dtype, self.settings, num_threads)
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = _stop_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.stop_ids[0]
        config = self.llm.llm_engine.model_config.hf_config
        self.tracker = UpdateTracker(
            checkpoint_names(model_path), bool(getattr(config, "tie_word_embeddings", False))
        )
        self.asleep = False

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def engine_workers(self) -> int:
        """How many engine workers (processes with a model shard) this actor drives."""
        return int(self.settings["tensor_parallel_size"])

    # ---- sampling ---------------------------------------------------------------------
    def _params(self, n_rows, *, max_new_tokens, greedy, temperature, top_p, seed, stop):
        from vllm import SamplingParams

        common = dict(
            max_tokens=max_new_tokens,
            stop_token_ids=list(self.stop_ids),
            stop=list(stop) or None,
            logprobs=0,  # the sampled token's log-prob only
            skip_special_tokens=True,
        )
        if greedy:
            return [SamplingParams(temperature=0.0, **common)] * n_rows
        return [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                seed=request_seed(seed, i),
                **common,
            )
            for i in range(n_rows)
        ]

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
        n: int = 1,
        stop: list[str] | None = None,
    ) -> Rollout:
        """Continue each prompt (``n`` independent samples each, rows grouped by prompt); see
        the module docstring for the output. ``stop``: stop strings besides
        ``rollout.vllm.stop`` (the stop tokens — EOS, ``<|im_end|>`` — always stop)."""
        if mix_alpha > 0:
            raise ValueError("the vllm sampler cannot sample a teacher-student mixture")
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: wake_up() before generating")
        rows = [list(p) for p in prompts for _ in range(n)]
        row_uids = [u for u in uids for _ in range(n)] if uids else None
        stops = list(self.settings["stop"] or []) + list(stop or [])
        params = self._params(
            len(rows), max_new_tokens=max_new_tokens, greedy=greedy,
            temperature=temperature, top_p=top_p, seed=seed, stop=stops,
        )  # fmt: skip
        outputs = self.llm.generate([eng.tokens_prompt(p) for p in rows], params, use_tqdm=False)
        seqs, masks, lps, texts, stopped = [], [], [], [], []
        for p, out in zip(rows, outputs):
            o = out.outputs[0]
            resp = list(o.token_ids)
            for j, t in enumerate(resp):  # cut after the first stop token, as hf does
                if t in self.stop_ids:
                    resp = resp[: j + 1]
                    break
            stopped.append(o.finish_reason == "stop" or (bool(resp) and resp[-1] in self.stop_ids))
            lp = [float(o.logprobs[j][t].logprob) for j, t in enumerate(resp)]
            seqs.append(p + resp)
            masks.append([0.0] * len(p) + [1.0] * len(resp))
            lps.append([0.0] * len(p) + lp)
            if isinstance(o.stop_reason, str):  # a stop string: vLLM cut the text before it
                texts.append(o.text)
            else:
                texts.append(self.tokenizer.decode(resp, skip_special_tokens=True))
        batch = pad_sequences(seqs, masks, self.pad_id, row_uids)
        return Rollout(
            batch,
            pad_rows(lps, batch.loss_mask) * batch.loss_mask,
            [len(p) for p in rows],
            texts,
            stopped=stopped,
        )

    # ---- weights ----------------------------------------------------------------------
    def _finish_update(self, loaded_names=None) -> None:
        self.llm.reset_prefix_cache()  # cached KV came from the old weights
        if loaded_names is not None:
            self.tracker.add(loaded_names)
        self.tracker.finish()

    def update_weights(self, named_tensors, finished: bool = True, borrow: bool = False) -> int:
        """Load one bucket into the running engine (in-process engine: the tensors are passed
        to the workers by reference; the engine copies them, so ``borrow`` changes nothing);
        ``finished`` closes the update."""
        if self.settings["multiprocessing"]:
            raise RuntimeError(
                "object_store weight sync needs the in-process vLLM engine "
                "(rollout.vllm.multiprocessing=false); use rollout.weight_sync=torch_group"
            )
        named = list(named_tensors)
        self.tracker.add([name for name, _ in named])
        self.llm.collective_rpc("raykd_load_bucket", args=(named,))
        if finished:
            self.llm.collective_rpc("raykd_finish_update")
            self._finish_update()
        return len(named)

    def join_weight_group(self, host: str, port: int, rank_offset: int, world: int, backend: str):
        """Every engine worker joins the learner's weight-sync group (torch_group)."""
        return self.llm.collective_rpc(
            "raykd_join_group", args=(host, port, rank_offset, world, backend)
        )

    def receive_weights(self) -> int:
        """Receive one broadcast update (torch_group); blocks until the learner has sent it.
        The names received are checked like an object-store update's."""
        names = self.llm.collective_rpc("raykd_receive_broadcast")[0]
        self._finish_update(names)
        return len(names)

    def load_ipc_weights(self, payload: list) -> int:
        """Load CUDA-IPC-shared buckets ``[(handle, layout), ...]`` of a colocated learner
        (cuda_ipc); a sleeping engine gets its weights back first, its KV cache after."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("raykd_load_ipc", args=(payload,))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        names = [entry[0] for _, layout in payload for entry in layout]
        self._finish_update(names)
        return len(names)

    def sleep(self, level: int = 1) -> None:
        """Release the engine's GPU memory while learners train (needs
        ``rollout.vllm.enable_sleep_mode``; CUDA only)."""
        if not self.settings["enable_sleep_mode"]:
            raise RuntimeError("rollout.vllm.enable_sleep_mode is off")
        self.llm.sleep(level=level)
        self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
