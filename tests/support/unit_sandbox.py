"""Run a command under the seccomp filters a systemd unit file asks for, as systemd 252 builds them.

    /usr/bin/python3 tests/support/unit_sandbox.py UNIT_FILE COMMAND [ARGS...]

Where systemd is not PID 1 (containers, CI) a unit cannot be started for real;
this applies the same kernel filters itself and then execs the command:
``SystemCallFilter=`` (allow list, ``~`` removals, ``@groups`` expanded by
``systemd-analyze syscall-filter``), ``SystemCallErrorNumber=``,
``MemoryDenyWriteExecute=`` and ``RestrictAddressFamilies=``.  Needs the
system's Python with libseccomp's bindings (Debian: python3-seccomp).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys

import seccomp  # type: ignore[import-not-found]

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def unit_settings(path: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit's [Service] section, in order (keys repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    with open(path, encoding="utf-8") as unit:
        for raw in unit:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line:
                key, value = line.split("=", 1)
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def syscall_groups() -> dict[str, list[str]]:
    """``@group`` -> members, from ``systemd-analyze syscall-filter``."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        item = line.strip()
        if line.startswith("@"):
            current = groups.setdefault(item.split()[0], [])
        elif item and not item.startswith("#") and current is not None:
            current.append(item.split()[0])
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= expand(groups[name], groups) if name.startswith("@") else {name}
    return found


def main() -> None:
    unit, command = sys.argv[1], sys.argv[2:]
    settings = unit_settings(unit)
    groups = syscall_groups()
    filters = []

    # Loaded first: the allow list (last) forbids seccomp() itself.
    guards = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        wx = PROT_WRITE | PROT_EXEC
        guards.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
        for call in ("mprotect", "pkey_mprotect"):
            guards.add_rule(
                seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC)
            )
        guards.add_rule(
            seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC)
        )
    for value in settings.get("RestrictAddressFamilies", []):
        assert not value.startswith("~"), "only allow lists are emulated"
        allowed = {int(getattr(socket, name)) for name in value.split()}
        refuse = seccomp.ERRNO(errno.EAFNOSUPPORT)
        for family in range(max(allowed)):
            if family not in allowed:
                guards.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.EQ, family))
        guards.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.GT, max(allowed)))
    filters.append(guards)

    entries = settings.get("SystemCallFilter", [])
    if entries:
        assert not entries[0].startswith("~"), "only an allow list first is emulated"
        allowed_calls: set[str] = set()
        for entry in entries:
            names = expand(entry.lstrip("~").split(), groups)
            allowed_calls = allowed_calls - names if entry.startswith("~") else allowed_calls | names
        number = settings.get("SystemCallErrorNumber", [""])[-1]
        default = seccomp.ERRNO(getattr(errno, number)) if number else seccomp.KILL_PROCESS
        allow_list = seccomp.SyscallFilter(defaction=default)
        for name in sorted(allowed_calls):
            with contextlib.suppress(RuntimeError, ValueError):  # not a system call of this architecture
                allow_list.add_rule(seccomp.ALLOW, name)
        filters.append(allow_list)

    for built in filters:
        built.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
