"""Where an output is written before it is complete, and who cleans up after a run that died.

Every output is written to a hidden file beside its destination and renamed onto it once complete
(writer.py, stills.py), so a destination is either absent, the old file, or the new complete one.
The hidden file is named by the run that writes it: `.<stem>.partial-<run>-<random><suffix>`,
run = `<host>-<pid>` (host: a short hash of the host's name). A run that ends normally removes its
own; one killed outright (`kill -9`, a lost worker) cannot, so the next attempt at the same
destination removes its predecessors: those of this host whose process is gone, or, when the
caller knows the earlier attempt is over (a retried task of a cluster, `everyone=True`), all but
its own. Partial files of other live runs on this host are left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
from pathlib import Path

log = logging.getLogger(__name__)

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_NAME = re.compile(r"\.partial-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+$")


def run_id() -> str:
    """This process's run: `<host>-<pid>` (read at each call: a forked worker is a run of its own)."""
    return f"{HOST}-{os.getpid()}"


def partial_path(dst: str | os.PathLike) -> Path:
    """A fresh hidden path beside `dst` for this run to write `dst` into."""
    dst = Path(dst)
    return dst.parent / f".{dst.stem}.partial-{run_id()}-{secrets.token_hex(3)}{dst.suffix}"


def partials_of(dst: str | os.PathLike) -> list[Path]:
    """Every hidden partial file of `dst` in its folder, any run's (this naming's or an older one's)."""
    dst = Path(dst)
    prefix, suffix = f".{dst.stem}.partial-", dst.suffix
    try:
        names = os.listdir(dst.parent)
    except OSError:  # no folder yet: nothing left behind
        return []
    return [dst.parent / n for n in names if n.startswith(prefix) and n.endswith(suffix)
            and "." not in n[len(prefix): len(n) - len(suffix)]]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_predecessors(dst: str | os.PathLike, everyone: bool = False) -> list[Path]:
    """Delete the partial files of `dst` that earlier attempts left: this host's whose process has
    ended, or with `everyone` every one not written by this process. Returns what was removed."""
    removed = []
    me = run_id()
    for path in partials_of(dst):
        m = _NAME.search(path.name[: len(path.name) - len(Path(dst).suffix)])
        if m and f"{m['host']}-{m['pid']}" == me:
            continue  # this process's own (an output being written right now)
        dead = m is not None and m["host"] == HOST and not _alive(int(m["pid"]))
        if everyone or dead:
            try:
                path.unlink()
                removed.append(path)
                log.info("removed %s, left by an earlier run", path)
            except FileNotFoundError:
                pass
    return removed
