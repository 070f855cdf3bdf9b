"""Seccomp deny-list filter, built as raw classic BPF and installed with ``prctl`` via ctypes.

Needs no privileges (only ``PR_SET_NO_NEW_PRIVS``) and no library: works in containers where
namespaces are blocked. Runs inside the sandboxed process, so it imports only the standard
library (it is loaded as a top-level module by the child interpreter, too).

What it blocks (``EPERM`` unless noted) once installed, for the process and anything it could
still start:

- process creation: ``fork``, ``vfork``, ``clone`` (threads too unless ``allow_threads``),
  ``clone3`` (``ENOSYS`` so that libc falls back to the filtered ``clone``);
- program execution: ``execve``, ``execveat``;
- sockets of every family: ``socket``, ``socketpair``, ``connect``, ``bind``, ``listen``,
  ``accept``, ``accept4``;
- signals to any other process: ``kill``/``tgkill``/``rt_(tg)sigqueueinfo`` are allowed only
  with the caller's own pid; ``tkill``, ``pidfd_*`` are denied; installing signal handlers
  and timers (``rt_sigaction``, ``setitimer``, ``alarm``, ``timer_create``) is denied, which
  keeps asynchronous code out of the harness's frames;
- leaving the process group: ``setsid``, ``setpgid`` (so the supervisor's ``killpg`` always
  reaches it);
- other processes' memory and state: ``ptrace``, ``process_vm_readv/writev``, ``kcmp``,
  ``process_madvise``, ``process_mrelease``, ``move_pages``, ``migrate_pages``; ``prlimit64``
  is allowed only for pid 0 / the caller; scheduling and priority setters;
- mounts and namespaces: ``mount``, ``umount2``, ``pivot_root``, ``chroot``, ``unshare``,
  ``setns`` and the new mount API (``open_tree`` … ``mount_setattr``);
- kernel attack surface: ``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring_*``,
  keyrings, module loading, ``kexec``, ``reboot``, swap, clocks, host names, ``syslog``,
  ``personality``, ``open_by_handle_at``/``name_to_handle_at``, ``fanotify_init``, ``iopl``;
- ``ioctl(TIOCSTI/TIOCLINUX)`` (typing into a terminal) and ``prctl(PR_SET_DUMPABLE)``;
- any other syscall ABI (i386 ``int 0x80``, x32): the process is killed (``SIGSYS``).

What it does not do: it does not restrict files (Landlock and the mount namespace do), memory
or CPU (rlimits, cgroup), or what the program computes. It is a deny-list: a syscall added to
the kernel later is allowed until listed here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i


def _arg_hi(i: int) -> int:
    return 16 + 8 * i + 4


_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K

RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000


def RET_ERRNO(err: int) -> int:  # noqa: N802 - mirrors the kernel macro
    return 0x00050000 | (err & 0xFFFF)


_CLONE_THREAD = 0x00010000
_PR_SET_DUMPABLE = 4
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C

# Syscall numbers. x86_64 from asm/unistd_64.h; aarch64 from asm-generic/unistd.h.
_COMMON_GENERIC = {  # numbers >= 424 are shared by all architectures
    "pidfd_send_signal": 424,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_open": 434,
    "clone3": 435,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "process_mrelease": 448,
}
_X86_64 = dict(
    _COMMON_GENERIC,
    rt_sigaction=13, ioctl=16, alarm=37, setitimer=38, socket=41, connect=42, accept=43,
    bind=49, listen=50, socketpair=53, clone=56, fork=57, vfork=58, execve=59, kill=62,
    ptrace=101, syslog=103, setpgid=109, setsid=112, rt_sigqueueinfo=129, uselib=134,
    personality=135, ustat=136, sysfs=139, setpriority=141, sched_setparam=142,
    sched_setscheduler=144, vhangup=153, pivot_root=155, _sysctl=156, prctl=157, adjtimex=159,
    chroot=161, acct=163, settimeofday=164, mount=165, umount2=166, swapon=167, swapoff=168,
    reboot=169, sethostname=170, setdomainname=171, iopl=172, ioperm=173, init_module=175,
    delete_module=176, quotactl=179, nfsservctl=180, tkill=200, lookup_dcookie=212,
    timer_create=222, clock_settime=227, tgkill=234, kexec_load=246, add_key=248,
    request_key=249, keyctl=250, ioprio_set=251, migrate_pages=256, unshare=272,
    move_pages=279, accept4=288, rt_tgsigqueueinfo=297, perf_event_open=298, fanotify_init=300,
    prlimit64=302, name_to_handle_at=303, open_by_handle_at=304, clock_adjtime=305, setns=308,
    process_vm_readv=310, process_vm_writev=311, kcmp=312, finit_module=313, sched_setattr=314,
    kexec_file_load=320, bpf=321, execveat=322, userfaultfd=323,
)  # fmt: skip
_AARCH64 = dict(
    _COMMON_GENERIC,
    ioctl=29, ioprio_set=30, umount2=39, mount=40, pivot_root=41, chroot=51, vhangup=58,
    quotactl=60, acct=89, personality=92, unshare=97, setitimer=103, kexec_load=104,
    init_module=105, delete_module=106, timer_create=107, clock_settime=112, syslog=116,
    ptrace=117, sched_setparam=118, sched_setscheduler=119, kill=129, tkill=130, tgkill=131,
    rt_sigaction=134, rt_sigqueueinfo=138, setpriority=140, reboot=142, setpgid=154,
    setsid=157, sethostname=161, setdomainname=162, prctl=167, settimeofday=170, adjtimex=171,
    socket=198, socketpair=199, bind=200, listen=201, accept=202, connect=203, add_key=217,
    request_key=218, keyctl=219, clone=220, execve=221, swapon=224, swapoff=225,
    migrate_pages=238, move_pages=239, rt_tgsigqueueinfo=240, perf_event_open=241, accept4=242,
    prlimit64=261, fanotify_init=262, name_to_handle_at=264, open_by_handle_at=265,
    clock_adjtime=266, setns=268, process_vm_readv=270, process_vm_writev=271, kcmp=272,
    finit_module=273, sched_setattr=274, bpf=280, execveat=281, userfaultfd=282,
    kexec_file_load=294,
)  # fmt: skip
# machine -> (AUDIT_ARCH_*, syscall table, first number of a foreign ABI to kill or None)
ARCHES = {
    "x86_64": (0xC000003E, _X86_64, 0x40000000),  # x32 syscalls have bit 30 set
    "aarch64": (0xC00000B7, _AARCH64, None),
}

DENIED = (
    # process creation and exec
    "fork", "vfork", "execve", "execveat",
    # sockets
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # signals and timers
    "tkill", "pidfd_send_signal", "pidfd_open", "pidfd_getfd", "rt_sigaction", "setitimer",
    "alarm", "timer_create", "setsid", "setpgid",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "process_madvise",
    "process_mrelease", "move_pages", "migrate_pages", "setpriority", "ioprio_set",
    "sched_setparam", "sched_setscheduler", "sched_setattr",
    # mounts and namespaces
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel surface
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "iopl", "ioperm", "name_to_handle_at", "open_by_handle_at", "syslog",
    "personality", "quotactl", "quotactl_fd", "lookup_dcookie", "vhangup", "uselib",
    "nfsservctl", "fanotify_init", "sysfs", "ustat", "_sysctl",
)  # fmt: skip
OWN_PID_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k & 0xFFFFFFFF)


def build_filter(pid: int, allow_threads: bool = False, machine: str | None = None) -> list:
    """The BPF program as ``(code, jt, jf, k)`` tuples; ``pid`` is the only signal target."""
    audit_arch, table, foreign = ARCHES[machine or platform.machine()]
    eperm = RET_ERRNO(errno.EPERM)
    prog = [
        _ins(_LD_W_ABS, _OFF_ARCH),
        _ins(_JEQ, audit_arch, 1, 0),
        _ins(_RET, RET_KILL_PROCESS),
        _ins(_LD_W_ABS, _OFF_NR),
    ]
    if foreign is not None:
        prog += [_ins(_JGE, foreign, 0, 1), _ins(_RET, RET_KILL_PROCESS)]

    def block(nr: int, body: list) -> None:
        # if nr matches run `body` (which always returns), else skip over it
        prog.append(_ins(_JEQ, nr, 0, len(body)))
        prog.extend(body)

    for name in DENIED:
        if name in table:
            block(table[name], [_ins(_RET, eperm)])
    block(table["clone3"], [_ins(_RET, RET_ERRNO(errno.ENOSYS))])
    if allow_threads:
        clone = [
            _ins(_LD_W_ABS, _arg_lo(0)),
            _ins(_JSET, _CLONE_THREAD, 0, 1),
            _ins(_RET, RET_ALLOW),
            _ins(_RET, eperm),
        ]
    else:
        clone = [_ins(_RET, eperm)]
    block(table["clone"], clone)
    own_pid = [
        _ins(_LD_W_ABS, _arg_lo(0)),
        _ins(_JEQ, pid, 0, 3),
        _ins(_LD_W_ABS, _arg_hi(0)),
        _ins(_JEQ, 0, 0, 1),
        _ins(_RET, RET_ALLOW),
        _ins(_RET, eperm),
    ]
    for name in OWN_PID_ONLY:
        block(table[name], own_pid)
    block(
        table["prlimit64"],
        [
            _ins(_LD_W_ABS, _arg_hi(0)),
            _ins(_JEQ, 0, 0, 3),
            _ins(_LD_W_ABS, _arg_lo(0)),
            _ins(_JEQ, 0, 2, 0),
            _ins(_JEQ, pid, 1, 0),
            _ins(_RET, eperm),
            _ins(_RET, RET_ALLOW),
        ],
    )
    block(
        table["ioctl"],
        [
            _ins(_LD_W_ABS, _arg_lo(1)),
            _ins(_JEQ, _TIOCSTI, 1, 0),
            _ins(_JEQ, _TIOCLINUX, 0, 1),
            _ins(_RET, eperm),
            _ins(_RET, RET_ALLOW),
        ],
    )
    block(
        table["prctl"],
        [
            _ins(_LD_W_ABS, _arg_lo(0)),
            _ins(_JEQ, _PR_SET_DUMPABLE, 0, 1),
            _ins(_RET, eperm),
            _ins(_RET, RET_ALLOW),
        ],
    )
    prog.append(_ins(_RET, RET_ALLOW))
    assert len(prog) < 4096
    return prog


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def supported() -> bool:
    return platform.machine() in ARCHES


def install(pid: int | None = None, allow_threads: bool = False) -> None:
    """Install the filter on the calling thread (and its future children); irreversible."""
    if not supported():
        raise OSError(errno.ENOSYS, f"seccomp filter: unsupported machine {platform.machine()}")
    prog = build_filter(os.getpid() if pid is None else pid, allow_threads)
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]  # fmt: skip
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
