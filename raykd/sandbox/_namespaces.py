"""Linux namespaces via ctypes (what ``unshare(1)``/bubblewrap do), plus capability dropping.

:func:`enter` is called in a freshly forked child. It creates, in one ``unshare``:

- a user namespace mapping only the caller's uid/gid (shown inside as 65534): the program
  keeps the caller's kernel uid (65534 when the supervisor dropped root), gains nothing on the
  host, and has no capabilities once :func:`drop_capabilities` ran;
- a network namespace: only a loopback interface that is down — no route to 127.0.0.1 of the
  host nor anywhere else;
- a PID namespace: the next child is its pid 1; when that process exits the kernel kills every
  process left in the namespace (double-forked daemons cannot outlive the run), and processes
  outside (supervisor, caller) have no pid inside;
- a mount namespace (propagation private): every mount read-only and nosuid; fresh tmpfs over
  ``/tmp``, ``/var/tmp``, ``/run``, ``/home``, ``/root`` (the interpreter's own directories
  bound back read-only when they live there) and over ``/proc`` (hidden: no host processes,
  no ``/proc/self/mem``); a minimal ``/dev`` (null, zero, full, random, urandom); the scratch
  dir is a size-limited tmpfs, the only writable place, gone with the namespace;
- IPC, UTS and cgroup namespaces.

Not isolated by it: CPU, memory and output volume (rlimits/cgroup), the syscalls the kernel
exposes to any process (seccomp), reads of files that remain visible (system dirs; Landlock
narrows those).
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
ALL = (
    CLONE_NEWUSER
    | CLONE_NEWNS
    | CLONE_NEWNET
    | CLONE_NEWPID
    | CLONE_NEWIPC
    | CLONE_NEWUTS
    | CLONE_NEWCGROUP
)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442
INSIDE_ID = 65534
HIDDEN = ("/tmp", "/var/tmp", "/run", "/home", "/root", "/mnt", "/media", "/srv", "/opt/home")
DEVICES = ("null", "zero", "full", "random", "urandom")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]  # fmt: skip
_PR_SET_DUMPABLE = 4
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]  # fmt: skip


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(src, target, fstype, flags, data=None) -> None:
    _check(_libc.mount(_b(src), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def set_readonly(path: str, recursive: bool) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    rc = _libc.syscall(_SYS_MOUNT_SETATTR, AT_FDCWD, _b(path), flags, ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)))  # fmt: skip
    _check(int(rc), f"mount_setattr {path}")


def unshare(flags: int = ALL) -> None:
    _check(_libc.unshare(flags), "unshare")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, f"write {path}: {e.strerror}") from None


def map_ids(pid: str = "self", uid: int | None = None, gid: int | None = None) -> None:
    """Map one outer uid/gid (default: the caller's own) to 65534 inside ``pid``'s user ns.

    An unprivileged process may map only its own ids, and only from inside. Root's kernel uid
    0 may only be mapped by a process in the parent namespace (CAP_SETFCAP there): the
    supervisor does that for the child when it did not drop root.
    """
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    if pid == "self":  # a process that changed uid is not dumpable: its /proc files are root's
        _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    _write(f"/proc/{pid}/setgroups", "deny")
    _write(f"/proc/{pid}/uid_map", f"{INSIDE_ID} {uid} 1")
    _write(f"/proc/{pid}/gid_map", f"{INSIDE_ID} {gid} 1")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def setup_mounts(scratch: str, keep: list[str], scratch_bytes: int) -> list[str]:
    """Build the read-only view described in the module docstring; returns hidden dirs."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep_fds = {}
    for p in keep:  # interpreter dirs to bind back if they live under a hidden dir
        rp = os.path.realpath(p)
        if any(_under(rp, h) for h in HIDDEN) and os.path.exists(rp):
            keep_fds[rp] = os.open(rp, os.O_PATH | os.O_CLOEXEC)
    dev_fds = {}
    for d in DEVICES:
        try:
            dev_fds[d] = os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC)
        except OSError:
            pass
    set_readonly("/", recursive=True)
    small = "size=1m,mode=0755"
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, small)
    for d, fd in dev_fds.items():
        os.close(os.open(f"/dev/{d}", os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/proc/self/fd/{fd}", f"/dev/{d}", None, MS_BIND)
        os.close(fd)
    hidden = []
    for h in HIDDEN:
        if os.path.isdir(h) and not os.path.islink(h):
            mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, small)
            hidden.append(h)
    for rp, fd in sorted(keep_fds.items()):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(rp, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(rp), exist_ok=True)
            os.close(os.open(rp, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(f"/proc/self/fd/{fd}", rp, None, MS_BIND | MS_REC)
        os.close(fd)
    os.makedirs(scratch, exist_ok=True)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={max(scratch_bytes, 1 << 16)},mode=0700")  # fmt: skip
    for h in [*hidden, "/dev"]:
        set_readonly(h, recursive=False)
    mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k")
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    return hidden


# capabilities
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable capability sets."""
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability; EPERM without CAP_SETPCAP (none to drop)
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")
