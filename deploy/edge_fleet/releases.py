"""Signed model releases: ``keygen``, ``release``, ``deploy``, ``rollback`` and ``status``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent import signing

from .broker import FleetError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's commands."""
    keygen = sub.add_parser("keygen", help="create the fleet's Ed25519 signing key pair")
    keygen.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes DIR/fleet.key and DIR/fleet.pub"
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    keygen.set_defaults(func=keygen_command)


def keygen_command(args: argparse.Namespace) -> int:
    """``edge-fleet keygen --out DIR``."""
    out: Path = args.out
    private_path, public_path = out / "fleet.key", out / "fleet.pub"
    if private_path.exists() and not args.force:
        raise FleetError(
            f"{private_path} exists; pass --force to replace it (boxes trusting it will refuse new releases)"
        )
    out.mkdir(parents=True, exist_ok=True)
    key = signing.generate()
    # Created 0600 from the start: the private key is never readable by others, even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signing.private_pem(key))
    os.chmod(private_path, 0o600)
    public = signing.PublicKey(key.public_key(), signing.key_id(key.public_key()))
    public_path.write_text(public.to_line() + "\n")
    print(f"wrote {private_path} (keep it secret) and {public_path}")
    print(f'add to each agent\'s config:\n[update]\ntrusted_keys = ["{public.to_line()}"]')
    return 0
