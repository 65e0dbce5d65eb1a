"""Where a user's unionfs state lives, and whether a process it names still runs. Imports
nothing heavy (not even pathlib): the launcher reads it before it decides whether anything
else must be imported at all."""

from __future__ import annotations

import os
import stat


def default_state_dir() -> str:
    """Where mount records and background logs live: ``/run/unionfs/mounts`` for root of the
    initial user namespace, and for any other user (or root of another user namespace, who
    cannot write the host's /run) a directory of their own (``$XDG_RUNTIME_DIR/unionfs/mounts``,
    else ``/tmp/unionfs-UID/mounts``), so that root's directory never stops a user's mount."""
    env = os.environ.get("UNIONFS_STATE_DIR")
    if env:
        return env
    uid = os.geteuid()
    if uid == 0 and not in_user_namespace():
        return "/run/unionfs/mounts"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            st = os.stat(runtime)
            if st.st_uid == uid and not st.st_mode & 0o022:
                return os.path.join(runtime, "unionfs", "mounts")
        except OSError:
            pass
    return f"/tmp/unionfs-{uid}/mounts"


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one (whose map
    is the identity over all 2^32 - 1 ids)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def server_socket() -> str:
    """The mount server's socket for this user (beside the mount records), or
    ``$UNIONFS_SERVER_SOCKET``."""
    return os.environ.get("UNIONFS_SERVER_SOCKET") or os.path.join(
        os.path.dirname(default_state_dir()), "server.sock"
    )


def private_dir(path: str | os.PathLike[str], create: bool = True) -> bool:
    """Whether ``path`` is a directory of this user's that nobody else can write (made, for
    this user only, when ``create`` and missing). A directory that is not is never used."""
    try:
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
