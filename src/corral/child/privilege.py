"""The I/O half of least privilege: real paths, users, and the policy built from the CLI.

The rules themselves are :mod:`corral.core.privilege`; this module resolves what they
compare (real paths, a user's uid and groups) and answers whether another user may read a
file or run a program (mode bits of the file and search permission on every directory on
the way; ACLs are not consulted).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from corral.child.process import Identity, as_user
from corral.core.args import FlagCatalog, LlamaConfig
from corral.core.privilege import DEFAULT_ENV, Judge, Policy, spellings_of
from corral.errors import NotAllowed, UsageError


@dataclass(frozen=True)
class RunAs:
    """The user llama-server runs as (``--user``)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @staticmethod
    def lookup(name: str) -> RunAs:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UsageError(f"--user {name}: no such user") from None
        groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
        return RunAs(name, entry.pw_uid, entry.pw_gid, groups)

    @property
    def identity(self) -> Identity:
        return Identity(self.uid, self.gid, self.groups)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run as this user (``--help``, ``llama-fit-params``)."""
        return as_user(argv, self.identity)

    def may(self, path: str, want: int) -> bool:
        """May this user open ``path`` with ``want`` (``os.R_OK`` / ``os.X_OK``)?"""
        real = os.path.realpath(path)
        parts = real.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i]) or "/"
            if not self._allowed(folder, os.X_OK):
                return False
        return self._allowed(real, want)

    def _allowed(self, path: str, want: int) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if self.uid == 0:
            return want != os.X_OK or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid in self.groups else 0
        bits = {os.R_OK: 4, os.X_OK: 1}[want] << shift
        return bool(st.st_mode & bits)

    def check(self, config: LlamaConfig, files: Iterable[str]) -> None:
        """Raise NotAllowed unless this user can run the binary and read every file."""
        if not self.may(config.binary, os.X_OK) or not self.may(config.binary, os.R_OK):
            raise NotAllowed("user", f"user {self.name} cannot run {config.binary} (--user): "
                             "make it and its directories readable and executable for them")
        for name in files:
            if not self.may(name, os.R_OK):
                raise NotAllowed("user", f"user {self.name} cannot read {name} (--user): "
                                 "make it and its directories readable for them")


def realpath(path: str) -> str:
    """The real path of ``path``; a bare program name is looked up on PATH first."""
    if os.sep not in path:
        path = shutil.which(path) or path
    return os.path.realpath(path)


def build_policy(trusted: LlamaConfig, catalog: FlagCatalog, *,
                 allow_binaries: Iterable[str] = (), model_dirs: Iterable[str] = (),
                 allow_flags: Iterable[str] = (), allow_env: Iterable[str] | None = None
                 ) -> Judge:
    """The policy of this supervisor: the command line's config is trusted; the rest as
    the ``--allow-*`` options say. Raises UsageError for a model dir that does not exist."""
    dirs = []
    for folder in model_dirs:
        real = os.path.realpath(folder)
        if not os.path.isdir(real):
            raise UsageError(f"--allow-model-dir {folder}: not a directory")
        dirs.append(real)
    binaries = {realpath(trusted.binary)}
    for binary in allow_binaries:
        if not os.path.isfile(realpath(binary)):
            raise UsageError(f"--allow-binary {binary}: not a file (or not on PATH)")
        binaries.add(realpath(binary))
    flags: set[str] = set()
    for name in [*allow_flags, *(k for k, _ in trusted.args)]:
        flags |= spellings_of(name if name.startswith("-") else f"--{name}", catalog)
    policy = Policy(frozenset(binaries), tuple(dirs), frozenset(flags),
                    tuple(allow_env) if allow_env is not None else DEFAULT_ENV, trusted)
    return Judge(policy, realpath)
