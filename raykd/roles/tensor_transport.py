"""Moving ``(name, tensor)`` buckets between processes with torch alone (no Ray, no vLLM).

Both ends of a weight sync use this module: the learner (raykd's venv) and the vLLM engine's
workers (vLLM's venv, through :mod:`raykd.roles.vllm.extension`), so it imports nothing but
torch.

* **Packing.** A bucket travels as one flat ``uint8`` buffer plus a small JSON-able layout
  (name, dtype, shape, byte offset of each tensor; offsets aligned to :data:`ALIGN` bytes so
  that every tensor can be viewed back in place). :func:`pack_bucket` / :func:`unpack_bucket`.
* **A stateless process group** (:func:`stateless_group`): ``TCPStore`` (the learner is the
  master, ``wait_for_workers=False``) + ``PrefixStore`` + ``ProcessGroupGloo`` on CPU or
  ``ProcessGroupNCCL`` on GPU. It is not the default ``torch.distributed`` group, which
  DeepSpeed (learner) and vLLM (engine) already own in their processes.
* **Broadcast protocol** (:func:`send_buckets` / :func:`receive_buckets`), root rank 0: an
  ``int64`` length, the JSON layout of every bucket, then one buffer per bucket.
* **A shared file mapping** (:func:`create_shared_buffer` / :func:`map_shared_buffer`): a
  packed buffer backed by a file on tmpfs (``/dev/shm``) that processes of one node map
  ``MAP_SHARED``; a write by one is seen by all with no copy and no message.
* **CUDA IPC** (:func:`export_ipc` / :func:`import_ipc`): a packed CUDA buffer shared with
  a colocated process by ``torch.multiprocessing.reductions.reduce_tensor``, keyed by the
  GPU's UUID (the receiver may number devices differently).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch

ALIGN = 16  # byte alignment of every tensor inside a packed buffer
GROUP_PREFIX = "raykd_weight_sync"
_ALIVE: list = []  # stores (and their listening sockets) of the groups this process made

NamedTensors = Sequence[tuple[str, torch.Tensor]]


# ---- packing -------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def bucket_layout(named_tensors: NamedTensors) -> tuple[list[list], int]:
    """``([[name, dtype, shape, offset, nbytes], ...], total_bytes)`` of a packed bucket."""
    layout, offset = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        layout.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes])
        offset += -(-nbytes // ALIGN) * ALIGN
    return layout, offset


def layout_bytes(layout: list[list]) -> int:
    """Size of the packed buffer a layout describes (its last tensor's end, aligned)."""
    if not layout:
        return 0
    _, _, _, offset, nbytes = layout[-1]
    return -(-(offset + nbytes) // ALIGN) * ALIGN


def pack_bucket(
    named_tensors: NamedTensors, device: torch.device | str | None = None
) -> tuple[torch.Tensor, list[list]]:
    """One flat ``uint8`` buffer holding every tensor's bytes, and its layout."""
    layout, total = bucket_layout(named_tensors)
    if device is None:
        device = named_tensors[0][1].device if named_tensors else "cpu"
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    pack_into(buf, named_tensors, layout)
    return buf, layout


def pack_into(buf: torch.Tensor, named_tensors: NamedTensors, layout: list[list]) -> int:
    """Copy every tensor's bytes into ``buf`` at its offset in ``layout`` (which must describe
    these very tensors: same names, dtypes and shapes, in order). Returns the bytes copied."""
    if len(layout) != len(named_tensors):
        raise ValueError(f"layout has {len(layout)} tensors, {len(named_tensors)} given")
    copied = 0
    for (name, t), (lname, dtype, shape, offset, nbytes) in zip(named_tensors, layout):
        if name != lname or list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
            raise ValueError(
                f"tensor {name!r} {str(t.dtype)} {list(t.shape)} does not match the layout's "
                f"{lname!r} {dtype} {shape}"
            )
        if nbytes:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            buf[offset : offset + nbytes].copy_(flat)
            copied += nbytes
    return copied


def unpack_bucket(buf: torch.Tensor, layout: list[list]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into ``buf`` (no copy), as :func:`pack_bucket` laid them out."""
    out = []
    for name, dtype, shape, offset, nbytes in layout:
        t = buf[offset : offset + nbytes].view(_dtype(dtype)).reshape(shape)
        out.append((name, t))
    return out


# ---- a stateless process group ---------------------------------------------------------------
def stateless_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 600.0,
):
    """A process group of its own (not ``torch.distributed``'s default one): rank 0 hosts the
    ``TCPStore`` at ``host:port``. Every rank must call this at about the same time; the call
    returns once all ranks have joined (gloo connects eagerly; NCCL on the first collective).
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    listen = None
    if rank == 0 and host in ("127.0.0.1", "localhost"):  # one node: listen on loopback only
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind(("127.0.0.1", port))
        listen.listen(128)
    store = dist.TCPStore(
        host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
        master_listen_fd=listen.fileno() if listen is not None else None,
    )  # fmt: skip
    _ALIVE.append((store, listen))
    store = dist.PrefixStore(GROUP_PREFIX, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [_gloo_device(host)]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weight-sync process group backend must be gloo or nccl, got {backend!r}")


def _gloo_device(host: str):
    """Loopback when the group's host is (a one-node run), else ``GLOO_SOCKET_IFNAME`` or
    gloo's default interface."""
    import torch.distributed as dist

    if host in ("127.0.0.1", "localhost"):
        return dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"])
    return dist.ProcessGroupGloo.create_default_device()


def group_backend(device: torch.device | str) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _broadcast(pg, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait()


def send_buckets(pg, buckets: Sequence[NamedTensors], device: torch.device | str) -> dict:
    """Root side of the protocol: broadcast the layout of every bucket, then each bucket's
    packed buffer (packed on ``device`` one bucket at a time: CPU for gloo, the GPU for
    NCCL). Returns counts."""
    layouts = [bucket_layout(b)[0] for b in buckets]
    header = json.dumps({"buckets": layouts}).encode()
    _broadcast(pg, torch.tensor([len(header)], dtype=torch.int64, device=device))
    _broadcast(pg, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device))
    nbytes = 0
    for bucket in buckets:
        buf, _ = pack_bucket(bucket, device)
        _broadcast(pg, buf)
        nbytes += buf.numel()
    return {"buckets": len(buckets), "tensors": sum(len(b) for b in buckets), "bytes": nbytes}


def receive_buckets(pg, device: torch.device | str) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receiving side: yields each bucket as ``(name, tensor)`` views into a fresh buffer on
    ``device`` (consume a bucket before asking for the next one)."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(pg, size)
    header = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _broadcast(pg, header)
    layouts = json.loads(header.cpu().numpy().tobytes().decode())["buckets"]
    for layout in layouts:
        buf = torch.empty(layout_bytes(layout), dtype=torch.uint8, device=device)
        _broadcast(pg, buf)
        yield unpack_bucket(buf, layout)


# ---- a shared file mapping (one node) ---------------------------------------------------------
def create_shared_buffer(path: str, nbytes: int) -> torch.Tensor:
    """A new file ``path`` (mode 0600; an existing one is an error) of ``nbytes``, its blocks
    reserved up front, mapped ``MAP_SHARED`` as a ``uint8`` tensor. Reserving matters on
    tmpfs: a full one fails here with ``OSError`` (ENOSPC) instead of killing the writer with
    SIGBUS on its first write past the free space."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(1, nbytes))
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return map_shared_buffer(path, nbytes)


def remove_stale_shared_files(directory: str, prefix: str) -> list[str]:
    """Remove the files ``<prefix><pid>-*`` in ``directory`` whose maker ``pid`` is no longer
    running (a process killed between making a shared file and removing its name); returns
    the paths removed. Files of live processes, and of other users', are left alone."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix) :].split("-", 1)[0] if name.startswith(prefix) else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except PermissionError:
            continue  # alive, another user's
        except ProcessLookupError:
            pass
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def map_shared_buffer(path: str, nbytes: int) -> torch.Tensor:
    """The file ``path`` (made by :func:`create_shared_buffer`) mapped ``MAP_SHARED`` as a
    ``uint8`` tensor of ``nbytes``: the mapping outlives the file's name (unlink it once every
    process has mapped it) and sees every write to it."""
    size = os.stat(path).st_size
    if size < nbytes:
        raise ValueError(f"shared weight file {path} holds {size} bytes, {nbytes} expected")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


# ---- CUDA IPC ----------------------------------------------------------------------------------
def device_uuid(index: int) -> str:
    """The physical GPU's UUID (stable across processes with different device numbering)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def export_ipc(buf: torch.Tensor) -> dict:
    """An IPC handle of a CUDA buffer: ``{gpu uuid: rebuild args}`` (see :func:`import_ipc`).
    The exporting process must keep ``buf`` alive until every importer is done with it."""
    from torch.multiprocessing.reductions import reduce_tensor

    if buf.device.type != "cuda":
        raise ValueError("CUDA IPC needs a CUDA tensor")
    _, args = reduce_tensor(buf)
    return {device_uuid(buf.device.index): tuple(args)}


#: Position of the device index in ``reduce_tensor``'s args for a CUDA tensor
#: (``rebuild_cuda_tensor(tensor_cls, size, stride, offset, storage_cls, dtype, device, ...)``).
IPC_DEVICE_ARG = 6


def ipc_rebuild_args(handle: dict, uuid: str, device_index: int) -> tuple:
    """The rebuild args of ``handle`` for the GPU ``uuid``, retargeted at this process's
    ``device_index``; a clear error when the buffer lives on another GPU (not colocated)."""
    if uuid not in handle:
        raise ValueError(
            f"CUDA IPC: the learner's buffer is on GPU(s) {sorted(handle)}, this engine worker "
            f"is on {uuid}; cuda_ipc needs colocated engines (use torch_group otherwise)"
        )
    args = list(handle[uuid])
    args[IPC_DEVICE_ARG] = device_index
    return tuple(args)


def import_ipc(handle: dict, device_index: int | None = None) -> torch.Tensor:
    """The buffer behind an :func:`export_ipc` handle, opened in this process."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = torch.cuda.current_device() if device_index is None else device_index
    return rebuild_cuda_tensor(*ipc_rebuild_args(handle, device_uuid(index), index))
