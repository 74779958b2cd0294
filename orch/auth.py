"""Tokens: generation, the token file in the data dir, rotation, constant-time checks, roles.

Pure: no aiohttp, no settings object. The scheduler's middleware
(``orch/scheduler/security.py``) and the CLI build on it.

Three kinds of secret:

* the **client** token: submit, read, cancel (every ``/v1`` route but the worker ones);
* the **join** token: register a worker (``POST /v1/workers``), nothing else;
* a **worker credential**: issued to one worker at registration, good for that
  worker's own ``/v1/workers/{worker_id}/...`` routes only. The scheduler keeps
  only its SHA-256 (in the store and in memory).

The client and join tokens live in ``<data_dir>/tokens.json`` (mode 0600,
written atomically), made on the scheduler's first start unless given in the
configuration (``auth.token``, ``auth.join_token``) or the environment
(``ORCH_TOKEN``, ``ORCH_JOIN_TOKEN``), which win over the file. Schedulers that
share a PostgreSQL database accept the tokens whose digests are in effect there
(``store.cluster_tokens``); the file then keeps this machine's copy of them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from orch.core.errors import ConfigError

TOKEN_FILE = "tokens.json"
ROLES = ("client", "join")
# Prefixes make a pasted token recognisable (and a wrong one easy to explain); any token works.
PREFIX = {"client": "orch_c_", "join": "orch_j_", "worker": "orch_w_"}
MAX_TOKEN_LEN = 512


def new_token(role: str) -> str:
    """A fresh random token: 256 bits from ``secrets``, URL-safe, with the role's prefix."""
    return PREFIX[role] + secrets.token_urlsafe(32)


def as_bytes(token: str) -> bytes:
    """Bytes of a token for comparison and hashing (header text may hold anything: never raise)."""
    return token.encode("utf-8", "surrogateescape")


def same(given: str | bytes | None, expected: str | bytes | None) -> bool:
    """Constant-time comparison (for equal lengths); None or empty never matches."""
    if not given or not expected:
        return False
    a = given if isinstance(given, bytes) else as_bytes(given)
    b = expected if isinstance(expected, bytes) else as_bytes(expected)
    return hmac.compare_digest(a, b)


def digest(token: str) -> str:
    """SHA-256 hex of a token: what the store keeps of a worker credential."""
    return hashlib.sha256(as_bytes(token)).hexdigest()


def new_worker_credential() -> tuple[str, str]:
    """A worker's own credential and its digest (the scheduler keeps only the digest)."""
    token = new_token("worker")
    return token, digest(token)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LEN:
        return None
    return token


def token_path(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / TOKEN_FILE


@dataclass(frozen=True)
class Tokens:
    client: str | None = None
    join: str | None = None

    def get(self, role: str) -> str | None:
        return self.client if role == "client" else self.join if role == "join" else None


class TokenFileError(ConfigError):
    """The token file cannot be read, parsed or written: one line at start-up, exit 2."""


def read_tokens(data_dir: Path) -> Tokens | None:
    """The tokens in the data dir's token file; None if there is none yet."""
    path = token_path(data_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TokenFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise TokenFileError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise TokenFileError(f"{path} must hold a JSON object")
    values = {}
    for role in ROLES:
        v = data.get(role)
        if v is not None and (not isinstance(v, str) or not v.strip() or len(v) > MAX_TOKEN_LEN):
            raise TokenFileError(f"{path}: {role!r} must be a non-empty string")
        values[role] = v.strip() if isinstance(v, str) else None
    return Tokens(**values)


def write_tokens(data_dir: Path, tokens: Tokens) -> Path:
    """Write the token file atomically (temp file, fsync, rename), mode 0600."""
    try:
        return _write_tokens(Path(data_dir).expanduser(), tokens)
    except OSError as e:  # a read-only or full data dir
        raise TokenFileError(f"cannot write {token_path(data_dir)}: {e.strerror or e}") from None


def _write_tokens(folder: Path, tokens: Tokens) -> Path:
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
    path = token_path(folder)
    tmp = folder / f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    body = json.dumps({"client": tokens.client, "join": tokens.join}, indent=2) + "\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise
    with _suppress_oserror():
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return isinstance(value, OSError)


def ensure_tokens(data_dir: Path) -> tuple[Tokens, bool]:
    """The token file's tokens, making the file (or a missing role in it) first; returns (tokens, created)."""
    tokens = read_tokens(data_dir)
    if tokens is not None and tokens.client and tokens.join:
        tighten(token_path(data_dir))
        return tokens, False
    tokens = Tokens(client=(tokens.client if tokens else None) or new_token("client"),
                    join=(tokens.join if tokens else None) or new_token("join"))
    write_tokens(data_dir, tokens)
    return tokens, True


def fresh(old: Tokens, roles: tuple[str, ...] = ROLES) -> Tokens:
    """``old`` with the given roles' tokens replaced by new ones (the others as they are, None too)."""
    return Tokens(client=new_token("client") if "client" in roles else old.client,
                  join=new_token("join") if "join" in roles else old.join)


def rotate(data_dir: Path, roles: tuple[str, ...] = ROLES) -> Tokens:
    """Replace the given roles' tokens in the token file with fresh ones; the others stay."""
    old = read_tokens(data_dir) or Tokens()
    new = Tokens(client=new_token("client") if "client" in roles else old.client or new_token("client"),
                 join=new_token("join") if "join" in roles else old.join or new_token("join"))
    write_tokens(data_dir, new)
    return new


def tighten(path: Path) -> bool:
    """Make a token file readable by its owner only; True if it had been readable by others."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        with _suppress_oserror():
            os.chmod(path, 0o600)
        return True
    return False


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the token file is rewritten (rename: new inode; edit: mtime, size)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def pick(flag: str | None, configured: str | None, data_dir: Path | None, role: str) -> str | None:
    """The token a CLI or worker uses: a flag, else the configuration (file or environment),
    else the data dir's token file (a scheduler on this machine). None if there is none."""
    for v in (flag, configured):
        if v and v.strip():
            return v.strip()
    if data_dir is None:
        return None
    try:
        tokens = read_tokens(data_dir)
    except TokenFileError:
        return None
    return tokens.get(role) if tokens else None
