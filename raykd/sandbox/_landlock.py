"""Landlock (unprivileged LSM) via ctypes: read-only allow-list, write only the scratch dir.

Needs no privileges (``PR_SET_NO_NEW_PRIVS``) and works where namespaces are blocked. Loaded
inside the sandboxed process, so it imports only the standard library.

What a restricted process can do afterwards:

- read and execute only beneath the ``read`` paths (the interpreter's standard library,
  ``/usr``, ``/lib*``, ``/bin``, a few ``/etc`` files, ``/dev/null|zero|urandom|random``): not
  ``/home``, ``/root``, ``/tmp``, ``/proc`` (no other process's ``environ`` or ``cmdline``, no
  ``/proc/self/mem``), not the project tree;
- write, create, remove, rename only beneath ``write`` paths (the scratch dir) and write to
  ``/dev/null``;
- ABI >= 4: no TCP ``bind``/``connect`` at all (UDP and Unix sockets are not covered: seccomp
  and the network namespace are);
- ABI >= 6: no signals to processes outside the domain (the supervisor, the caller) and no
  connecting to abstract Unix sockets.

It does not limit reads of files already open (the inherited stdout/stderr), CPU, memory, or
processes. Rules apply to the calling thread and its future children and cannot be lifted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
_PR_SET_NO_NEW_PRIVS = 38


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """Landlock ABI of the running kernel; 0 if unavailable (not built in, disabled, ENOSYS)."""
    libc = _libc()
    v = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(v), 0)


def fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def restrict(read: list[str], write: list[str], dev_write: list[str] = ()) -> dict:
    """Restrict the calling thread; returns what was enforced. Raises ``OSError`` on failure.

    Missing paths in ``read``/``write`` are skipped (reported under ``"skipped"``).
    """
    abi = abi_version()
    if abi < 1:
        raise OSError(errno.ENOSYS, "Landlock is not available")
    handled = fs_rights(abi)
    attr = _RulesetAttr(handled, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    libc = _libc()
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    skipped = []
    read_rights = handled & (EXECUTE | READ_FILE | READ_DIR)
    try:
        rules = [(p, read_rights) for p in read] + [(p, handled) for p in write]
        rules += [(p, handled & (READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV)) for p in dev_write]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                skipped.append(path)
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= _FILE_RIGHTS
                rule = _PathBeneath(rights, fd)
                rc = libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
                if rc != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                               ctypes.c_ulong]  # fmt: skip
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return {"abi": abi, "net": abi >= 4, "scope": abi >= 6, "skipped": skipped}
