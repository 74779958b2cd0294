"""The composition root: the one place that picks a storage backend and wires it to the scheduler."""

from __future__ import annotations

from aiohttp import web

from orch import auth
from orch.config import Settings
from orch.core.errors import ConfigError
from orch.scheduler.app import build_app as _build_app
from orch.store.base import Store


def store_for(settings: Settings) -> Store:
    """The store ``storage.backend`` names, not yet opened."""
    if settings["storage.backend"] == "postgres":
        from orch.store.postgres import PostgresStore

        if not settings["storage.dsn"]:
            raise ConfigError("storage.backend is postgres: storage.dsn (ORCH_STORAGE_DSN) must name the database, "
                              "e.g. postgresql://orch@127.0.0.1:5432/orch")
        return PostgresStore(settings["storage.dsn"], output_limit=settings["scheduler.output_limit_bytes"],
                             pool_size=settings["storage.pool_size"], notify=settings["storage.notify"])
    from orch.store.sqlite import SqliteStore

    return SqliteStore(settings.db_path, synchronous=settings["storage.synchronous"],
                       output_limit=settings["scheduler.output_limit_bytes"])


def build_app(settings: Settings, store: Store | None = None) -> web.Application:
    """The scheduler's aiohttp application on ``store`` (by default the configured backend's)."""
    return _build_app(settings, store if store is not None else store_for(settings))


async def rotate_shared(settings: Settings, roles: tuple[str, ...]) -> tuple[auth.Tokens, dict[str, str]]:
    """``orch token rotate`` on a shared database: new tokens for ``roles`` (the others as this machine's
    tokens.json has them), their digests put in the database, where every scheduler of it takes them within a
    second. Returns the tokens, for the caller to show and write to tokens.json, and the digests in effect."""
    new = auth.fresh(auth.read_tokens(settings.data_dir) or auth.Tokens(), roles)
    store = store_for(settings)
    await store.open()
    try:
        return new, await store.put_tokens({role: auth.digest(new.get(role) or "") for role in roles}, replace=True)
    finally:
        await store.close()


def startup_error(e: BaseException, settings: Settings) -> BaseException:
    """A failure of the backend's files or connection at start-up as one line (an OrchError); anything else
    (a bug) as it is."""
    import sqlite3

    from orch.core.errors import StorageError

    if isinstance(e, sqlite3.Error):
        from orch.store.sqlite import storage_error

        mapped = storage_error(e, settings.db_path)
        return mapped if mapped is not e else StorageError(f"cannot use the database {settings.db_path}: {e}")
    if isinstance(e, OSError):
        return StorageError(f"cannot start: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    return e


def database_name(settings: Settings) -> str:
    """Where ``settings`` keep state, as a person names it (a PostgreSQL DSN without its password)."""
    if settings["storage.backend"] == "postgres":
        from orch.store.postgres import PostgresStore

        return PostgresStore(settings["storage.dsn"]).where()
    return str(settings.db_path)
