"""Ed25519 signatures over release manifests (``cryptography`` does the cryptography).

A public key travels as one OpenSSH line (``ssh-ed25519 AAAA… comment``): the
form ``edge-fleet keygen`` writes to ``fleet.pub`` and the agent's
``[update] trusted_keys`` lists.  A key's id is the first 16 hex digits of the
SHA-256 of its raw 32 bytes; a signature names the id of the key that made it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_contract.errors import SignatureError


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key and its id."""

    key: Ed25519PublicKey
    key_id: str

    @classmethod
    def from_line(cls, line: str) -> PublicKey:
        """Parse one ``ssh-ed25519 AAAA… [comment]`` line."""
        try:
            key = serialization.load_ssh_public_key(line.strip().encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SignatureError(f"not an OpenSSH public key line: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError("only ssh-ed25519 keys are accepted")
        return cls(key, key_id(key))

    def to_line(self, comment: str = "edge-fleet") -> str:
        """The one-line OpenSSH form, as ``fleet.pub`` holds it."""
        raw = self.key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return f"{raw.decode()} {comment}"


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private: Ed25519PrivateKey, data: bytes) -> tuple[str, str]:
    """``(key_id, base64 signature)`` of ``data``."""
    return key_id(private.public_key()), base64.b64encode(private.sign(data)).decode()


def verify(trusted: list[PublicKey], signer: str, signature: str, data: bytes) -> PublicKey:
    """Check that ``signature`` over ``data`` was made by the trusted key ``signer``.

    Raises ``SignatureError`` with code ``untrusted_key`` when no trusted key has
    that id, and ``bad_signature`` when the signature does not verify.
    """
    key = next((k for k in trusted if k.key_id == signer), None)
    if key is None:
        raise SignatureError(f"signed by key {signer}, which this agent does not trust", code="untrusted_key")
    try:
        raw = base64.b64decode(signature, validate=True)
        key.key.verify(raw, data)
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise SignatureError(f"the signature does not match (key {signer})", code="bad_signature") from exc
    return key


def generate() -> Ed25519PrivateKey:
    """A new private key."""
    return Ed25519PrivateKey.generate()


def private_pem(private: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM of a private key (unencrypted: protect the file itself)."""
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private(data: bytes) -> Ed25519PrivateKey:
    """A private key from its PEM."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("only Ed25519 private keys are accepted")
    return key
