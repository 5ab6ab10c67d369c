"""File modes of what alignkit writes: weight files and folders get the permissions the umask gives any new file.

`safetensors.torch.save_file` creates its file with mode 0600, and `tempfile.mkdtemp` its folder with 0700,
whatever the umask; a model written for a team (umask 022, 002) would be unreadable to everyone but its owner.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike[str]) -> None:
    """Give `path` the mode a plain `open()` or `mkdir()` would have: 0666 or 0777 less the umask."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with the file's mode set by the umask instead of 0600."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)
