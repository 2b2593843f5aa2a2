"""Signatures over program files (ed25519, with the maintained ``cryptography`` library).

A signature covers the whole manifest (``docs/format.md``) except its ``signatures`` list, and
the manifest lists every segment's SHA-256: signing the manifest signs every byte of the program.
It is stored in the manifest as ``{"key": <public key, 64 hex>, "signature": <128 hex>}``.

Keys (see ``docs/security.md``):

* the **local key**: ``$HANDOFF_HOME/keys/local.pem`` (private, mode 0600), created on first use;
  ``partition`` signs every program it writes with it, and the runtime trusts it, so local work
  needs no flags;
* **trusted keys**: the public keys (PEM, ``*.pem`` or ``*.pub``) in ``$HANDOFF_HOME/trusted/``
  and in any ``--trusted-keys DIR`` the user names.

Only programs that carry native code need a trusted signature to load (``Runtime.native_code``);
data-only programs load unsigned. The lowering cache authenticates its entries with the local key
too. This module imports ``cryptography`` only when it signs or verifies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import HandoffError, one_line

#: What a program signature signs, before the manifest's canonical JSON (domain separation: a
#: signature over a program is never valid as one over a cache entry, and the other way round).
PROGRAM_DOMAIN = b"handoff program manifest v1\0"
CACHE_DOMAIN = b"handoff lowering cache entry v1\0"
KEYS_DIR, TRUSTED_DIR, LOCAL_KEY = "keys", "trusted", "local.pem"


def _home() -> Path:
    from .cache import handoff_home

    return handoff_home()


def canonical(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a program signature signs: the manifest without ``signatures``, as the writer
    encodes it (compact, key-sorted UTF-8 JSON)."""
    unsigned = {k: v for k, v in manifest.items() if k != "signatures"}
    text = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return PROGRAM_DOMAIN + text.encode("utf-8")


def key_id(public: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


class LocalKey:
    """The user's own signing key, created under ``$HANDOFF_HOME/keys`` on first use."""

    def __init__(self, path: Path | None = None):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.path = path or _home() / KEYS_DIR / LOCAL_KEY
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption())
            try:  # O_EXCL: two processes creating the key at once keep the first one's
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
            except FileExistsError:
                pass
        try:
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise HandoffError(f"{self.path}: cannot read the signing key ({one_line(exc, 200)}); move it away "
                               f"and a new one is created, or point --key at an ed25519 PEM key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise HandoffError(f"{self.path}: not an ed25519 private key; handoff signs with ed25519")
        self._key = key
        self.public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def id(self) -> str:
        return key_id(self.public)

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign_bytes(self, data: bytes) -> str:
        return self._key.sign(data).hex()

    def sign(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        """The signature entry for ``manifest`` (which must already hold its ``segments``)."""
        return {"key": self.public.hex(), "signature": self.sign_bytes(canonical(manifest))}


@functools.lru_cache(maxsize=4)
def _local_key_cached(path: str) -> LocalKey:
    return LocalKey(Path(path))


def local_key() -> LocalKey:
    """The local key of the current ``$HANDOFF_HOME`` (created on first use, cached per path)."""
    return _local_key_cached(str(_home() / KEYS_DIR / LOCAL_KEY))


def _load_public(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise HandoffError(f"{path}: not a PEM public key ({one_line(exc, 150)}); export one with "
                           f"`handoff key` on the signer's machine") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise HandoffError(f"{path}: not an ed25519 public key; handoff signatures are ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trusted_keys(extra_dirs: Iterable[str | os.PathLike[str]] = ()) -> dict[str, str]:
    """Public key (hex) -> where it is trusted from: the local key, ``$HANDOFF_HOME/trusted`` and
    each of ``extra_dirs`` (every ``*.pem`` / ``*.pub`` file in them)."""
    keys = {local_key().public.hex(): "the local key"}
    dirs = [_home() / TRUSTED_DIR, *map(Path, extra_dirs)]
    for i, directory in enumerate(dirs):
        if not directory.is_dir():
            if i:  # a directory the user named must exist
                raise HandoffError(f"--trusted-keys {directory}: no such directory; give a directory of PEM "
                                   f"public keys (*.pem)")
            continue
        for path in sorted([*directory.glob("*.pem"), *directory.glob("*.pub")]):
            keys.setdefault(_load_public(path).hex(), str(path))
    return keys


@dataclasses.dataclass
class Verdict:
    """What the signatures of a manifest say.

    :param trusted_by: where the first valid signature's key is trusted from, or ``None``.
    :param signers: key ids of every valid signature.
    :param invalid: key ids of signatures that do not verify (tampered, or signed something else).
    """

    trusted_by: str | None
    signers: list[str]
    invalid: list[str]

    def describe(self) -> str:
        if self.trusted_by:
            return f"signed by key {self.signers[0]} (trusted: {self.trusted_by})"
        if self.signers:
            return f"signed by key {', '.join(self.signers)}, which is not trusted here"
        if self.invalid:
            return f"its signature by key {', '.join(self.invalid)} does not verify (the file was changed after signing)"
        return "not signed"


def verify(manifest: Mapping[str, Any], trusted: Mapping[str, str]) -> Verdict:
    """Check every signature of ``manifest`` against its content (never raises for bad input)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signatures = manifest.get("signatures") or []
    verdict = Verdict(None, [], [])
    if not signatures:
        return verdict
    data = canonical(manifest)
    for entry in signatures:
        try:
            public, signature = bytes.fromhex(entry["key"]), bytes.fromhex(entry["signature"])
            Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
        except (InvalidSignature, ValueError, KeyError, TypeError):
            verdict.invalid.append(key_id(bytes.fromhex(entry["key"])) if _is_hex(entry.get("key"), 64) else "?")
            continue
        verdict.signers.append(key_id(public))
        if verdict.trusted_by is None and public.hex() in trusted:
            verdict.trusted_by = trusted[public.hex()]
    return verdict


def _is_hex(text: Any, length: int) -> bool:
    return isinstance(text, str) and len(text) == length and not text.strip("0123456789abcdef")


def sign_entry(data: bytes) -> str:
    """The local key's signature over a lowering-cache entry's ``data``."""
    return local_key().sign_bytes(CACHE_DOMAIN + data)


def entry_is_authentic(data: bytes, signature: Any) -> bool:
    """Whether ``signature`` is the local key's over a cache entry's ``data``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not _is_hex(signature, 128):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(local_key().public).verify(bytes.fromhex(signature), CACHE_DOMAIN + data)
        return True
    except InvalidSignature:
        return False
