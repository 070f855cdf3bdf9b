"""vLLM worker extension: new weights into a running engine, and a logit scale for scorers.

vLLM mixes this class into its worker class (``LLM(worker_extension_cls=...)``); the actor
calls its methods on every engine worker through ``LLM.collective_rpc(name, args=...)``.
It runs in vLLM's virtualenv and imports only torch, vLLM and
:mod:`raykd.roles.tensor_transport`.

**Loading.** An update is a session: :meth:`raykd_load_bucket` (any number of buckets, any
split of the weights, checkpoint names as the learner's ``state_dict`` has them) and
:meth:`raykd_finish_update`. The session is vLLM's layerwise reload
(``vllm.model_executor.model_loader.reload``): ``initialize_layerwise_reload`` at the first
bucket, ``model.load_weights`` per bucket (a layer is re-processed — e.g. re-packed for
oneDNN on CPU — once all its weights have arrived, so a bucket boundary may split a fused
layer), ``finalize_layerwise_reload`` at the end. Plain ``model.load_weights`` alone fails on
CPU (prepacked linear weights have no ``weight_loader``). A tied ``lm_head`` keeps its old
prepacked copy through a reload (the module's documented limitation 2), so it is re-processed
from the new embedding afterwards. The caller then resets the prefix cache.

**Transports.** The bucket arrives as a Python argument (object store, in-process engine
only: a multiprocess engine serialises ``collective_rpc`` arguments with msgpack), from a
torch process-group broadcast (:meth:`raykd_join_group` / :meth:`raykd_receive_broadcast`,
gloo on CPU, NCCL on GPU), or as CUDA IPC handles of colocated learner buffers
(:meth:`raykd_load_ipc`).
"""

from __future__ import annotations

import torch

from raykd.roles.tensor_transport import (
    import_ipc,
    receive_buckets,
    stateless_group,
    unpack_bucket,
)


class WeightSyncExtension:
    """Methods vLLM adds to its worker (``self`` is the worker: ``self.model_runner``,
    ``self.vllm_config``, ``self.device``). Names start with ``raykd_`` so that they never
    clash with the worker's own."""

    # ---- one update session ------------------------------------------------------------
    def _raykd_model(self):
        return self.model_runner.get_model()

    def raykd_load_bucket(self, named_tensors) -> int:
        """Load one bucket of ``(name, tensor)`` pairs (starts a session if none is open)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self._raykd_model()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            if not getattr(self, "_raykd_updating", False):
                initialize_layerwise_reload(model)
                self._raykd_updating = True
                self._raykd_loaded = 0
            model.load_weights(list(named_tensors))
        self._raykd_loaded += len(named_tensors)
        return len(named_tensors)

    def raykd_finish_update(self) -> int:
        """Close the session: re-process the layers, refresh a tied ``lm_head``. Returns the
        number of tensors loaded in the session."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not getattr(self, "_raykd_updating", False):
            return 0
        model = self._raykd_model()
        config = self.vllm_config.model_config
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            finalize_layerwise_reload(model, config)
            if getattr(config.hf_text_config, "tie_word_embeddings", False):
                lm_head = getattr(model, "lm_head", None)
                method = getattr(lm_head, "quant_method", None)
                if method is not None:
                    method.process_weights_after_loading(lm_head)
        self._raykd_updating = False
        return self._raykd_loaded

    # ---- torch process group (gloo / NCCL broadcast from learner rank 0) -------------------
    def raykd_join_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> int:
        """Join the learner's weight-sync group as rank ``rank_offset + this worker's rank``
        (blocks until every member has joined). Returns the rank taken."""
        rank = rank_offset + self.rank
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        self._raykd_group = stateless_group(host, port, rank, world_size, backend)
        self._raykd_group_device = self.device if backend == "nccl" else torch.device("cpu")
        return rank

    def raykd_receive_broadcast(self) -> list[str]:
        """Receive one full update over the group and load it; returns the tensor names."""
        names: list[str] = []
        for bucket in receive_buckets(self._raykd_group, self._raykd_group_device):
            names += [name for name, _ in bucket]
            self.raykd_load_bucket(bucket)
        self.raykd_finish_update()
        return names

    def raykd_leave_group(self) -> None:
        group = getattr(self, "_raykd_group", None)
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()
        self._raykd_group = None

    # ---- CUDA IPC (colocated learner) ------------------------------------------------------
    def raykd_load_ipc(self, payload: list) -> int:
        """Load buckets shared by CUDA IPC: ``payload`` is ``[(handle, layout), ...]`` from
        :func:`raykd.roles.tensor_transport.export_ipc`; the learner keeps the buffers alive
        until this returns. Returns the tensor count."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        for handle, layout in payload:
            buf = import_ipc(handle, index)
            self.raykd_load_bucket(unpack_bucket(buf, layout))
        n = self.raykd_finish_update()
        torch.cuda.synchronize(self.device)  # every copy out of the shared buffers is done
        return n

    # ---- scorers: logits at temperature tau ------------------------------------------------
    def raykd_scale_logits(self, factor: float) -> float:
        """Multiply the model's logits by ``factor`` (``1 / tau``) from now on, relative to
        the model's own scale; ``1.0`` restores it. Prompt log-probs then are
        ``log_softmax(z / tau)``."""
        processor = getattr(self._raykd_model(), "logits_processor", None)
        if processor is None or not hasattr(processor, "scale"):
            raise NotImplementedError(
                "this model has no logits_processor.scale: vLLM scoring works at "
                "temperature 1 only for it"
            )
        if not hasattr(self, "_raykd_base_scale"):
            self._raykd_base_scale = float(processor.scale)
        processor.scale = self._raykd_base_scale * float(factor)
        return processor.scale
