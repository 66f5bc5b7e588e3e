"""One SQL layer over SQLite (the embedded default) and PostgreSQL (``postgresql://`` DSNs).

Statements are written once, with ``?`` placeholders and SQL both databases speak
(``INSERT … ON CONFLICT``, no ``%``); the PostgreSQL adapter turns ``?`` into ``%s``.
Each thread gets its own connection, in autocommit mode; ``transaction()`` groups
statements atomically.  The foreign errors of both drivers become ``StoreError`` here,
where they enter.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import StoreError

Dialect = Literal["sqlite", "postgresql"]
Row = tuple[Any, ...]


def is_postgres(dsn: str) -> bool:
    """Whether ``dsn`` names a PostgreSQL database rather than a SQLite file."""
    return dsn.startswith(("postgresql://", "postgres://"))


class Database:
    """A database named by a SQLite path or a PostgreSQL DSN, one connection per thread."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.dialect: Dialect = "postgresql" if is_postgres(dsn) else "sqlite"
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        if self.dialect == "sqlite":
            Path(dsn).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._conn()  # fail now, with the fix, rather than at the first request

    @property
    def where(self) -> str:
        """The database for messages (a DSN without its password)."""
        if self.dialect == "sqlite":
            return self.dsn
        _head, at, tail = self.dsn.rpartition("@")
        return f"postgresql://…@{tail}" if at else self.dsn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            if self.dialect == "sqlite":
                conn = sqlite3.connect(
                    Path(self.dsn).expanduser(), timeout=30, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            else:
                import psycopg

                conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {self.where}: {exc} (check --db)") from None
        except Exception as exc:  # psycopg.Error: the driver is imported lazily
            raise StoreError(
                f"cannot connect to the database {self.where}: {exc} "
                "(is PostgreSQL running, the DSN right, the user allowed?)"
            ) from None
        self._local.conn = conn
        self._local.depth = 0
        with self._lock:
            self._all.append(conn)
        return conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        try:
            cursor = self._conn().execute(self._sql(sql), tuple(params))
            return int(cursor.rowcount)
        except Exception as exc:
            raise _translated(self, exc) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row."""
        if not rows:
            return
        try:
            if self.dialect == "sqlite":
                self._conn().executemany(sql, [tuple(r) for r in rows])
            else:
                with self._conn().cursor() as cursor:
                    cursor.executemany(self._sql(sql), [tuple(r) for r in rows])
        except Exception as exc:
            raise _translated(self, exc) from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Every row of a query."""
        try:
            return [tuple(r) for r in self._conn().execute(self._sql(sql), tuple(params)).fetchall()]
        except Exception as exc:
            raise _translated(self, exc) from None

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """The first row of a query, or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """Statements inside commit together or not at all (nested: joins the outer one)."""
        conn = self._conn()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield self
            finally:
                self._local.depth -= 1
            return
        self._local.depth = 1
        try:
            if self.dialect == "sqlite":
                self.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                self.execute("COMMIT")
            else:
                try:
                    with conn.transaction():
                        yield self
                except StoreError:
                    raise
                except Exception as exc:
                    if type(exc).__module__.startswith("psycopg"):
                        raise _translated(self, exc) from None
                    raise
        finally:
            self._local.depth = 0

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all.clear()
        self._local = threading.local()


def _translated(db: Database, exc: Exception) -> Exception:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("psycopg"):
        return StoreError(f"database {db.where}: {exc}".strip())
    return exc
