"""Learner role: one DeepSpeed engine per actor, one data-parallel rank per actor.

The controller builds a learner group of ``world_size`` actors, asks rank 0 for a rendezvous
address, then calls :meth:`Learner.setup` on every rank at once (``init_distributed`` blocks
until all ranks join). Each optimizer step is one :meth:`Learner.train_step` call carrying this
rank's micro-batches (``grad_accum`` of them); the loss is a plain function of
``(model, micro_batch, **kwargs)`` that the algorithm module defines and ships by reference,
so an algorithm stays readable in one file while its loss runs here. Gradients are
all-reduced by DeepSpeed (gloo on CPU, NCCL on GPU); ZeRO stage 0-3 comes from config.

Colocated teachers (``cfg["teachers"]``, used by ``dense_kd``): frozen float32 models in this
actor, outside DeepSpeed, handed to the loss as ``teachers=[...]`` so that full-vocabulary
teacher logits never leave the process. With ``cfg["hidden_projection"]`` a
:class:`~raykd.losses.HiddenProjector` (student width -> first teacher's width) is attached to
the student as ``model.raykd_projector`` before DeepSpeed wraps it, so DeepSpeed trains and
all-reduces it and saves it in checkpoints; :meth:`state_dict` (hence :meth:`export` and weight
sync) drops its ``raykd_projector.*`` keys, so the exported model is the plain architecture.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raykd.atomic import atomic_write_json, publish_dir, recover_dir
from raykd.roles.step_guard import GuardedAdamW, StepGuard, any_rank, held_step, local_grad_norm

SHARED_PREFIX = "raykd-weights-"  # shared_memory weight sync: <prefix><pid>-<random>


def _skip_cpu_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-building its shared-memory all-reduce op.

    The op (~35 s of compiling, once per environment; an actor killed mid-build leaves a lock
    that hangs every later build) serves only DeepSpeed's ``inference_all_reduce``; training
    collectives go through ``torch.distributed`` (gloo). Marking it incompatible makes
    ``init_distributed`` skip the build."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _loopback_process_group(backend: str, port: int, rank: int, world: int) -> None:
    """The default process group with its rendezvous store on 127.0.0.1 only (torch's own
    ``env://`` store listens on every interface); DeepSpeed then reuses the group.

    Rank 0 binds the listening socket itself and hands its fd to the store server."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    listen = None
    if rank == 0:
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind(("127.0.0.1", port))
        listen.listen(128)
    store = dist.TCPStore(
        "127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(minutes=10),
        wait_for_workers=False, master_listen_fd=listen.fileno() if listen else None,
    )  # fmt: skip
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    _KEEP.append((store, listen))


_KEEP: list = []  # the store and its socket live as long as the process group


def _weights_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint reader with ``torch.load(weights_only=True)``: tensors,
    containers and primitives, plus the few plain-data DeepSpeed types its checkpoints hold
    (loss-scaler state, the ZeRO stage enum, fragment addresses). A checkpoint that needs
    anything else fails to load instead of running code. The run directory is trusted only
    as far as this: its config is YAML, metrics JSON, models safetensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def _set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)


class Learner:
    """A DeepSpeed data-parallel rank. Construct cheaply; :meth:`setup` joins the group."""

    def __init__(self, rank: int, world_size: int, num_threads: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.num_threads = num_threads
        if num_threads:  # Ray exports OMP_NUM_THREADS=1 to fractional-CPU actors
            os.environ["OMP_NUM_THREADS"] = str(num_threads)
        _set_threads(num_threads)
        self.engine = None
        self.step = 0
        self.teachers: list | None = None  # colocated frozen teachers (setup cfg "teachers")
        self.guard = StepGuard(3, rank)  # skipped non-finite steps; last checkpoint
        self._shared = None  # (path, mapped buffer, layout) of shared_memory weight sync

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group."""
        import ray

        from raykd.roles.runtime import free_port

        single_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
        addr = "127.0.0.1" if single_node else ray.util.get_node_ip_address()
        return addr, free_port(addr)

    def setup(self, master_addr: str, master_port: int, model_path: str, cfg: dict) -> int:
        """Join the process group, load the model, build the DeepSpeed engine.

        ``cfg``: ``zero_stage, lr, weight_decay, betas, warmup_steps, micro_batch_size,
        grad_accum, grad_clip, gradient_checkpointing, trainable ('all'|'layers'), seed``;
        optional ``teachers`` (model dirs to colocate), ``hidden_projection`` (bool) and
        ``max_bad_steps`` (default 3: consecutive non-finite steps before
        :class:`~raykd.roles.step_guard.NonFiniteTrainingError`).
        Returns the number of trainable parameters.
        """
        from raykd.models.checks import check_safetensors

        self.guard = StepGuard(int(cfg.get("max_bad_steps", 3)), self.rank)
        check_safetensors(model_path)  # a truncated file is named, not a SafetensorError
        import deepspeed
        from transformers import AutoModelForCausalLM

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            LOCAL_RANK="0",
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE="1",
        )
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            _skip_cpu_shm_op()
        if master_addr == "127.0.0.1":
            _loopback_process_group(
                "nccl" if on_gpu else "gloo", master_port, self.rank, self.world_size
            )
        deepspeed.init_distributed(
            dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, verbose=False
        )
        torch.manual_seed(cfg.get("seed", 0))
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.config.use_cache = False
        if cfg.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable()
        if cfg.get("trainable", "all") == "layers":
            for name, p in model.named_parameters():
                p.requires_grad_(".layers." in name)
        if cfg.get("teachers"):
            self._load_teachers(cfg["teachers"], on_gpu)
            if cfg.get("hidden_projection"):
                from raykd.losses import HiddenProjector

                d_teacher = self.teachers[0].config.hidden_size
                model.raykd_projector = HiddenProjector(model.config.hidden_size, d_teacher)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = GuardedAdamW(
            params, lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"]
        )
        self._optimizer = optimizer
        warmup = max(0, int(cfg.get("warmup_steps", 0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg["micro_batch_size"],
            "gradient_accumulation_steps": cfg["grad_accum"],
            "gradient_clipping": cfg["grad_clip"],
            "zero_optimization": {"stage": cfg["zero_stage"]},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bool(on_gpu and cfg.get("bf16", True))},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.grad_accum = cfg["grad_accum"]
        _set_threads(self.num_threads)  # DeepSpeed's CPU accelerator resets the thread count
        return sum(p.numel() for p in params)

    def _load_teachers(self, paths: list[str], on_gpu: bool) -> None:
        from transformers import AutoModelForCausalLM

        from raykd.models.checks import check_safetensors

        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu"
        self.teachers = []
        for path in paths:
            check_safetensors(path)
            teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            teacher.config.use_cache = False
            teacher.eval().requires_grad_(False)
            self.teachers.append(teacher.to(device))

    # ---- training ---------------------------------------------------------------------
    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Callable, **loss_kwargs
    ) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns mean metrics.

        ``loss_fn(model, micro_batch, **loss_kwargs) -> (loss, metrics)``. A step whose loss
        or gradient is not finite on any rank is skipped on every rank (weights, optimizer
        state and learning-rate schedule unchanged; ``skipped`` is 1 in the metrics) and
        logged as a warning; ``max_bad_steps`` such steps in a row raise
        :class:`~raykd.roles.step_guard.NonFiniteTrainingError` (:mod:`raykd.roles.step_guard`).
        """
        if len(micro_batches) != self.grad_accum:
            raise ValueError(
                f"rank {self.rank}: got {len(micro_batches)} micro-batches, "
                f"grad_accum is {self.grad_accum}"
            )
        self.engine.train()
        if self.teachers:
            loss_kwargs = {**loss_kwargs, "teachers": self.teachers}
        totals: dict[str, float] = {}
        finite, refused, grad_norm = True, False, None
        for i, mb in enumerate(micro_batches):
            loss, metrics = loss_fn(self.engine, mb, **loss_kwargs)
            self.engine.backward(loss)
            finite = finite and bool(torch.isfinite(loss.detach()).all())
            if i == len(micro_batches) - 1:  # the accumulation boundary: the real step
                grad_norm = local_grad_norm(self.engine.module)  # None under ZeRO
                grads_ok = grad_norm is None or math.isfinite(grad_norm)
                refused = any_rank(not (finite and grads_ok), self.engine.device)
                held_step(self.engine, self._optimizer, refused)
            else:
                self.engine.step()
            for k, v in {"loss": loss.item(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        self.step += 1
        totals["lr"] = self.engine.get_lr()[0]
        gn = self.engine.get_global_grad_norm()
        if gn is None:
            gn = grad_norm  # DeepSpeed reports none without ZeRO
        if gn is not None:
            totals["grad_norm"] = float(gn)
        skipped = refused or not self.engine.was_step_applied()  # ZeRO's own overflow check
        totals["skipped"] = float(skipped)
        self.guard.record(self.step, skipped, totals)
        return totals

    @torch.no_grad()
    def forward_logprobs(self, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Aligned log-prob of each given token under the current weights, ``[B, T]``."""
        from raykd.batch import token_logprobs

        self.engine.eval()
        out = self.engine(
            input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"]
        )
        return token_logprobs(out.logits, micro_batch["input_ids"]).float()

    # ---- weights ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (gathered under ZeRO-3; every rank must call); None elsewhere.
        Copies (a tied weight once): the caller may keep them while training goes on."""
        return self._full_weights(copy=True)

    def _full_weights(self, copy: bool) -> dict[str, torch.Tensor] | None:
        """Rank 0: every weight by name, tied names sharing one tensor; views of the live
        parameters unless ``copy`` or ZeRO-3 (whose gathered parameters are released on
        return). None on other ranks; every rank must call (ZeRO-3 gathers)."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        copy = copy or self.engine.zero_optimization_stage() == 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank != 0:
                return None
            out: dict[str, torch.Tensor] = {}
            copies: dict[tuple, torch.Tensor] = {}
            for k, v in module.state_dict().items():
                if k.startswith("raykd_projector."):  # training-only head, not exported
                    continue
                v = v.detach()
                if copy:
                    view = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
                    v = copies[view] if view in copies else copies.setdefault(view, v.clone())
                out[k] = v
            return out

    def weight_buckets(self, bucket_bytes: int) -> list:
        """Rank 0: the full weights as object-store refs of ``(name, tensor)`` buckets (each
        storage once: a tied ``lm_head`` is the embedding); ``[]`` on other ranks. Every rank
        must call (ZeRO-3 gathers)."""
        import ray

        from raykd.roles.weight_sync import named_buckets

        named = self._sync_tensors()
        if named is None:
            return []
        # ray.put copies each bucket into the store: the live weights need no copy before
        return [ray.put(b) for b in named_buckets(named, bucket_bytes)]

    # ---- weight sync through a shared file mapping (raykd.roles.weight_sync) ----------------
    def open_shared_weights(self, directory: str) -> dict | None:
        """Rank 0: a new file in ``directory`` (tmpfs) mapped here and holding the weights to
        sync, packed (:func:`~raykd.roles.tensor_transport.bucket_layout`); returns
        ``{path, layout, bytes, node}`` for the samplers to map, or ``{error}`` when the file
        cannot be made (no room, no directory). None on other ranks; every rank must call."""
        import uuid

        import ray

        from raykd.roles import tensor_transport as tt

        named = self._sync_tensors()
        if named is None:
            return None
        self.close_shared_weights()
        tt.remove_stale_shared_files(directory, SHARED_PREFIX)  # left by a killed learner
        layout, total = tt.bucket_layout(named)
        path = os.path.join(directory, f"{SHARED_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            buf = tt.create_shared_buffer(path, total)
        except OSError as e:
            return {"error": f"cannot make {total / 2**20:.0f} MiB in {directory}: {e}"}
        self._shared = (path, buf, layout)
        tt.pack_into(buf, named, layout)
        node = ray.get_runtime_context().get_node_id()
        return {"path": path, "layout": layout, "bytes": total, "node": node}

    def write_shared_weights(self) -> int:
        """Rank 0: copy the current weights into the mapping of :meth:`open_shared_weights`
        (the samplers that mapped it see them at once); returns the bytes written, 0 on other
        ranks. Every rank must call (ZeRO-3 gathers)."""
        from raykd.roles.tensor_transport import pack_into

        named = self._sync_tensors()
        if named is None:
            return 0
        if self._shared is None:
            raise RuntimeError("write_shared_weights before open_shared_weights")
        _, buf, layout = self._shared
        return pack_into(buf, named, layout)

    def unlink_shared_weights(self) -> None:
        """Rank 0: remove the mapped file's name once every sampler has mapped it (the
        mappings stay; nothing is left in tmpfs if a process dies later)."""
        if self._shared is not None and os.path.exists(self._shared[0]):
            os.unlink(self._shared[0])

    def close_shared_weights(self) -> None:
        """Drop this process's mapping (and the file's name if it is still there)."""
        self.unlink_shared_weights()
        self._shared = None

    # ---- weight sync over a torch process group / CUDA IPC (raykd.roles.weight_sync) -------
    def _sync_tensors(self) -> list[tuple[str, torch.Tensor]] | None:
        """Rank 0: the weights to sync as ``(name, tensor)`` pairs, each storage once (a tied
        ``lm_head`` left out), as views of the live weights where those are whole (below
        ZeRO-3): the caller copies them out (object store, packed buckets) before training
        goes on. None on other ranks. Every rank must call (ZeRO-3 gathers)."""
        from raykd.roles.weight_sync import distinct_tensors

        sd = self._full_weights(copy=False)
        if sd is None:
            return None
        if getattr(self.engine.module.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return distinct_tensors(sd.items())

    def weight_group_address(self) -> tuple[str, int, str]:
        """Rank 0: ``(host, free port, backend)`` of a new weight-sync group (``gloo`` for
        CPU weights, ``nccl`` for CUDA ones)."""
        from raykd.roles.tensor_transport import group_backend

        host, port = self.rendezvous()
        return host, port, group_backend(next(self.engine.module.parameters()).device)

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> int:
        """Rank 0: host the weight-sync group as its rank 0 (returns once all have joined)."""
        from raykd.roles.tensor_transport import stateless_group

        device = next(self.engine.module.parameters()).device if backend == "nccl" else "cpu"
        self._weight_group = (stateless_group(host, port, 0, world_size, backend), device)
        return 0

    def broadcast_weights(self, bucket_bytes: int) -> dict:
        """Every rank calls; rank 0 broadcasts the weights in buckets over the weight-sync
        group (:func:`raykd.roles.tensor_transport.send_buckets`). Returns its counts."""
        from raykd.roles.tensor_transport import send_buckets
        from raykd.roles.weight_sync import named_buckets

        named = self._sync_tensors()
        if named is None:
            return {}
        group, device = self._weight_group
        return send_buckets(group, list(named_buckets(named, bucket_bytes)), device)

    def share_weights_ipc(self, bucket_bytes: int) -> list:
        """Every rank calls; rank 0 packs the weights into CUDA buffers, kept alive until
        :meth:`release_ipc_weights`, and returns ``[(ipc handle, layout), ...]``."""
        from raykd.roles.tensor_transport import export_ipc, pack_bucket
        from raykd.roles.weight_sync import named_buckets

        named = self._sync_tensors()
        if named is None:
            return []
        self._ipc_buffers, payload = [], []
        for bucket in named_buckets(named, bucket_bytes):
            buf, layout = pack_bucket(bucket)
            self._ipc_buffers.append(buf)
            payload.append((export_ipc(buf), layout))
        torch.cuda.synchronize()
        return payload

    def release_ipc_weights(self) -> None:
        self._ipc_buffers = []

    def weight_digest(self) -> float:
        """A fingerprint of this rank's full weights (sum of |w| in float64) to compare ranks.

        Under ZeRO-3 every rank gathers the full parameters first (collective)."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return float(sum(p.detach().double().abs().sum() for p in params))

    def export(self, path: str, tokenizer_path: str) -> str | None:
        """Save the full model (safetensors, transformers-loadable) atomically, rank 0 only."""
        from transformers import AutoTokenizer

        sd = self.state_dict()
        if self.rank != 0:
            return None
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        module = self.engine.module
        if getattr(module.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # tied to the embeddings: store it once
        module.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)
        publish_dir(tmp, target)
        return str(target)

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its shard into ``<dir>.tmp``; rank 0 swaps it in."""
        import torch.distributed as dist

        target = Path(ckpt_dir)
        tmp = target.with_name(target.name + ".tmp")
        self.engine.save_checkpoint(str(tmp), tag="step", client_state=client_state)
        dist.barrier()
        if self.rank == 0:
            atomic_write_json(tmp / "raykd_state.json", client_state)
            publish_dir(tmp, target)
        dist.barrier()
        self.guard.last_checkpoint = (str(target), int(client_state.get("step", self.step)))

    def load_checkpoint(self, ckpt_dir: str) -> dict[str, Any] | None:
        target = Path(ckpt_dir)
        recover_dir(target)
        if not (target / "raykd_state.json").exists():
            return None
        engine = self.engine.checkpoint_engine
        engine.load = _weights_only_load  # never unpickle code from a checkpoint file
        _, client_state = self.engine.load_checkpoint(str(target), tag="step")
        self.step = int(client_state.get("step", 0))
        self.guard.last_checkpoint = (str(target), self.step)
        return client_state
