"""A session's shared-memory arena: one file in /dev/shm/tsqp-<uid>/ (0600 in a 0700 directory), mapped
by the runner and the server. Tensors are views of it; control messages carry offsets.

Lifecycle: the runner creates the file, the server maps it and unlinks it at once, so after that the
memory lives exactly as long as the two mappings and no crash can leave a file behind. A runner that
dies before the server attached leaves a file named after its pid; `remove_stale()` clears those.
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
from pathlib import Path

import torch

from ..files import private_dir
from .protocol import WIRE_DTYPES, ProtocolError, TensorMeta

SHM_ROOT = Path(os.environ.get("TSQP_SHM_ROOT", "/dev/shm"))
NAME = re.compile(r"^(\d+)-[0-9a-f]{16}$")
LEFTOVER = re.compile(r"^(\d+)-[0-9a-f]{16}(\.req|\.rep)?$")     # an arena, or its control pipes
ALIGN = 256


class ArenaError(RuntimeError):
    """The arena cannot be created, attached, or cannot hold a request."""


def arena_dir() -> Path:
    return private_dir(SHM_ROOT / f"tsqp-{os.getuid()}", ArenaError, repair=True, parents=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Unlink arenas (and pipes) whose creating process is gone (a runner killed before the server attached)."""
    removed = []
    for f in arena_dir().iterdir():
        m = LEFTOVER.match(f.name)
        if m and not pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f.name)
    return removed


class Arena:
    def __init__(self, mm: mmap.mmap, name: str, size: int, path: Path | None):
        self.mm, self.name, self.size, self.path = mm, name, size, path
        self.base = torch.frombuffer(mm, dtype=torch.uint8)        # [size] bytes
        self.ptr = self.base.data_ptr()
        self.cuda_registered = False
        self.live: dict[int, int] = {}     # allocator (runner side): live regions, start -> end
        self.views: dict[tuple, torch.Tensor] = {}     # (offset, shape, dtype) -> view, for empty()
        self.made: dict[int, tuple[torch.Tensor, int]] = {}   # id(view) -> (view, offset), for offset_of()

    @classmethod
    def create(cls, size: int) -> "Arena":
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        d = arena_dir()
        remove_stale()
        vfs = os.statvfs(d)
        free = vfs.f_bavail * vfs.f_frsize
        if free < size:
            raise ArenaError(f"{SHM_ROOT} has {free / 2**20:.0f} MiB free, the arena needs {size / 2**20:.0f} MiB; "
                             f"enlarge it (docker: --shm-size) or use --transport frames")
        name = f"{os.getpid()}-{secrets.token_hex(8)}"
        path = d / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)   # fail now, not with SIGBUS later, if tmpfs runs out
            mm = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise ArenaError(f"cannot create a {size / 2**20:.0f} MiB arena in {d}: {e}") from None
        os.close(fd)
        return cls(mm, name, size, path)

    @classmethod
    def anonymous(cls, size: int) -> "Arena":
        """Process-private staging memory with the same allocator (in-process offload to a GPU)."""
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        return cls(mmap.mmap(-1, size), "anonymous", size, None)

    @classmethod
    def attach(cls, name: str, size: int) -> "Arena":
        """Map a runner's arena (server side) and unlink its file."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ProtocolError(f"bad arena name {name!r}")
        path = arena_dir() / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ArenaError(f"cannot open arena {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise ArenaError(f"arena {path} is not owner-only (uid {st.st_uid}, mode {oct(st.st_mode)})")
            if st.st_size != size:
                raise ArenaError(f"arena {path} has {st.st_size} bytes, the hello said {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        return cls(mm, name, size, None)

    # ---- views -------------------------------------------------------------------------------------
    def view(self, meta: TensorMeta) -> torch.Tensor:
        """The tensor at meta.offset; the region is checked against the arena's bounds."""
        off, n = meta.offset, meta.nbytes
        if off is None or off % 8 or off < 0 or off + n > self.size:
            raise ProtocolError(f"region offset={off} nbytes={n} lies outside the {self.size}-byte arena "
                                f"or is misaligned")
        return self.base[off:off + n].view(WIRE_DTYPES[meta.dtype]).view(meta.shape)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """The offset of a contiguous tensor that lives inside this arena, else None."""
        made = self.made.get(id(t))
        if made is not None and made[0] is t:      # one of empty()'s views: known without asking torch
            return made[1]
        p = t.data_ptr()
        if t.is_contiguous() and self.ptr <= p and p + t.numel() * t.element_size() <= self.ptr + self.size:
            return p - self.ptr
        return None

    # ---- allocation (runner side) ---------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        """First fit from the start, skipping regions still live (inputs of requests in flight, results not yet
        consumed). Each step of a prefill or decode thus gets the same offsets every time, which lets both
        sides reuse what they checked and built for a region layout. Fails clearly when nothing fits."""
        n = (max(nbytes, 1) + ALIGN - 1) // ALIGN * ALIGN
        if n > self.size:
            raise ArenaError(f"a {nbytes / 2**20:.1f} MiB tensor does not fit the {self.size / 2**20:.0f} MiB "
                             f"arena; raise --arena-mb")
        start = 0
        for s, e in sorted(self.live.items()):
            if start + n <= s:
                break
            start = max(start, e)
        if start + n > self.size:
            live = sum(e - s for s, e in self.live.items())
            raise ArenaError(f"the {self.size / 2**20:.0f} MiB arena cannot hold another {nbytes / 2**20:.1f} MiB "
                             f"({live / 2**20:.1f} MiB in flight); raise --arena-mb")
        self.live[start] = start + n
        return start

    def free(self, offset: int) -> None:
        self.live.pop(offset, None)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = dtype.itemsize
        for s in shape:
            n *= s
        off = self.alloc(n)
        key = (off, tuple(shape), dtype)      # a prefill allocates the same regions each time: reuse their views
        view = self.views.get(key)
        if view is None:
            if len(self.views) >= 4096:
                self.views.clear()
                self.made.clear()
            view = self.views[key] = self.base[off:off + n].view(dtype).view(shape)
            self.made[id(view)] = (view, off)
        return view

    # ---- pinned for DMA (server side, CUDA) ----------------------------------------------------------
    def register_cuda(self) -> None:
        rc = torch.cuda.cudart().cudaHostRegister(self.ptr, self.size, 0)
        if int(rc) != 0:
            raise ArenaError(f"cudaHostRegister of the {self.size}-byte arena failed with code {int(rc)}")
        self.cuda_registered = True

    def close(self) -> None:
        if self.cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.ptr)
            self.cuda_registered = False
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        # the mapping itself goes when the last tensor view of it is collected
        self.base, self.views, self.made = None, {}, {}
