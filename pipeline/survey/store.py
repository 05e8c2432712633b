"""Participants, their assigned items and their answers, in any SQLAlchemy database (SQLite by default).

Every answer is its own committed transaction, so a crash loses at most the answer being sent. On SQLite the
file is put in WAL mode (readers never block the writer) with full fsync, and write transactions start with
BEGIN IMMEDIATE so that concurrent participants queue for the write lock instead of failing.
A participant is known only by a random token (its SHA-256 is stored); nothing here returns another
participant's answers to a participant.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import hmac
import logging
import random
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.core.errors import SipatError

# Completion codes: no letters and digits that read alike (O/0, I/1)
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"

log = logging.getLogger(__name__)

ANSWERS = ("unperturbed", "perturbed")


class SurveyStoreError(SipatError, RuntimeError):
    """A response database that cannot be opened or does not hold this project's tables."""


metadata = sa.MetaData()

participants = sa.Table(
    "participants", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("external_id", sa.String(64), nullable=True, unique=True),
    sa.Column("completion_code", sa.String(64), nullable=False),
    sa.Column("user_agent", sa.String(256), nullable=True),
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("completed_at", sa.String(32), nullable=True),
)

items = sa.Table(
    "items", metadata,
    sa.Column("participant_id", sa.Integer, sa.ForeignKey("participants.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("pool_index", sa.Integer, nullable=False),
    sa.Column("image_id", sa.String(512), nullable=False),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("eps_255", sa.Integer, nullable=False),
    sa.Column("still_adversarial", sa.Boolean, nullable=False),
    sa.Column("file", sa.String(512), nullable=False),
)

responses = sa.Table(
    "responses", metadata,
    sa.Column("participant_id", sa.Integer, primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("answer", sa.String(16), nullable=False),
    sa.Column("shown_at", sa.String(32), nullable=True),  # when the question page was served (from the form)
    sa.Column("answered_at", sa.String(32), nullable=False),
    sa.Column("response_ms", sa.Integer, nullable=True),
    # measured in the participant's browser, from the image on screen to the click (the server's response_ms
    # also holds the server's own delays)
    sa.Column("client_ms", sa.Integer, nullable=True),
    sa.ForeignKeyConstraint(["participant_id", "position"], ["items.participant_id", "items.position"]),
)

# Values the survey's server processes share, e.g. the key that signs page timestamps: a timestamp signed by
# one process verifies in every other process serving the same database.
settings = sa.Table(
    "settings", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

EXPORT_FIELDS = ("participant", "external_id", "version", "position", "pool_index", "image_id", "label", "eps_255",
                 "eps", "perturbed", "answer", "said_perturbed", "correct", "still_adversarial", "file",
                 "shown_at", "answered_at", "response_ms", "started_at", "completed", "completion_code",
                 "client_ms")


def is_export_csv(path: str | Path) -> bool:
    """Whether `path` is a responses CSV as `sipat survey export` or `simulate` write it (judged by its header),
    so that writing it again may replace it."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader([f.readline()]), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    # older exports have a prefix of today's columns
    return len(header) >= 4 and tuple(header) == EXPORT_FIELDS[:len(header)]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _ms_between(start: Optional[str], end: str) -> Optional[int]:
    if not start:
        return None
    delta = _dt.datetime.fromisoformat(end) - _dt.datetime.fromisoformat(start)
    return int(delta.total_seconds() * 1000)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL as is, or a file path for SQLite."""
    s = str(db)
    if "://" in s:
        return s
    return f"sqlite:///{Path(s).expanduser()}"


@dataclass(frozen=True)
class PoolImage:
    """One pool image of a survey version: its files per budget (k/255 -> path relative to the set folder)."""

    index: int
    image_id: str
    label: int
    files: dict[int, str]
    still_adversarial: dict[int, bool]


@dataclass(frozen=True)
class Participant:
    id: int
    version: str
    completion_code: str
    completed_at: Optional[str]


@dataclass(frozen=True)
class Item:
    participant_id: int
    position: int
    version: str
    pool_index: int
    eps_255: int
    file: str


class SurveyStore:
    """The survey's database: create tables, assign participants, record answers, export."""

    def __init__(self, url: str | Path, *, seed: int = 0, completion_code: Optional[str] = None):
        self.url = database_url(url)
        self.seed = seed
        self.fixed_code = completion_code
        self._lock = threading.Lock()  # assignment balance within one server process on any database
        try:
            self.engine = self._engine(self.url)
            # one write transaction (BEGIN IMMEDIATE on SQLite): servers started at once on a new database
            # queue here instead of failing with "database is locked" or "table already exists"
            with self._write() as conn, conn.begin():
                metadata.create_all(conn)
            self._add_missing_columns()
            self.signing_key = self._shared_secret("signing_key")
            # what each participant is shown and in which order is drawn with this key, never from the public
            # survey.seed and the participant number, which would let anyone reproduce every question's ε
            self.draw_key = self._shared_secret("draw_key")
        except sa.exc.ArgumentError as err:
            raise SurveyStoreError(f"not a database URL: {url!r} ({err})") from None
        except sa.exc.OperationalError as err:
            raise SurveyStoreError(f"cannot open the response database {self.url}: {err.orig}") from None

    @staticmethod
    def _engine(url: str) -> Engine:
        u = sa.engine.make_url(url)
        if u.get_backend_name() != "sqlite":
            return sa.create_engine(url, pool_pre_ping=True)
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 60},
                                  pool_size=8, max_overflow=24)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

        return engine

    def _write(self) -> Any:
        return self.engine.connect().execution_options(write=True)

    def _add_missing_columns(self) -> None:
        """A database made by an earlier version: add the columns it lacks (nullable, so old rows stay valid)."""
        insp = sa.inspect(self.engine)
        with self._write() as conn, conn.begin():
            for table in (participants, items, responses, settings):
                have = {c["name"] for c in insp.get_columns(table.name)}
                for col in table.columns:
                    if col.name not in have and col.nullable:
                        conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {col.name} "
                                             f"{col.type.compile(self.engine.dialect)}")

    def _rng(self, *parts: Any) -> random.Random:
        """A generator seeded by the database's secret draw key and `parts`."""
        digest = hmac.new(self.draw_key, ":".join(map(str, parts)).encode(), hashlib.sha256).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def _shared_secret(self, name: str) -> bytes:
        """A random key stored once in the database, the same for every process that opens it."""
        for _ in range(2):  # a concurrent first insert on a database without BEGIN IMMEDIATE: read theirs
            try:
                with self._write() as conn, conn.begin():
                    value = conn.execute(sa.select(settings.c.value).where(settings.c.name == name)).scalar()
                    if value is None:
                        value = secrets.token_hex(32)
                        conn.execute(settings.insert().values(name=name, value=value))
                return bytes.fromhex(value)
            except sa.exc.IntegrityError:
                continue
        raise SurveyStoreError(f"{self.url}: cannot store the shared {name}")

    # ------------------------------------------------------------------------------------------ participants

    def join(self, pools: dict[str, list[PoolImage]], n_images: int, *, external_id: Optional[str] = None,
             user_agent: Optional[str] = None) -> tuple[str, Participant]:
        """A new participant: the least-used version, its least-shown pool images, all budgets, shuffled.

        Returns the participant's secret token (only its hash is stored) and the participant.
        """
        token = secrets.token_urlsafe(32)
        with self._lock, self._write() as conn, conn.begin():
            counts = dict(conn.execute(sa.select(participants.c.version, sa.func.count())
                                       .group_by(participants.c.version)).all())
            n_total = sum(counts.values())
            rng = self._rng("version", n_total)
            names = sorted(pools)
            version = min(names, key=lambda v: (counts.get(v, 0), rng.random()))
            code = self.fixed_code or "".join(secrets.choice(CODE_ALPHABET) for _ in range(10))
            pid = conn.execute(participants.insert().values(
                token_sha256=hash_token(token), version=version, external_id=external_id, completion_code=code,
                user_agent=(user_agent or "")[:256], started_at=now())).inserted_primary_key[0]
            shown = dict(conn.execute(
                sa.select(items.c.pool_index, sa.func.count()).where(items.c.version == version)
                .where(items.c.eps_255 == 0).group_by(items.c.pool_index)).all())
            rng = self._rng("participant", pid)
            pool = pools[version]
            chosen = sorted(pool, key=lambda p: (shown.get(p.index, 0), rng.random()))[:n_images]
            rows = [dict(participant_id=pid, version=version, pool_index=p.index, image_id=p.image_id,
                         label=p.label, eps_255=k, still_adversarial=p.still_adversarial[k], file=f)
                    for p in chosen for k, f in sorted(p.files.items())]
            rng.shuffle(rows)
            for pos, row in enumerate(rows, start=1):
                row["position"] = pos
            conn.execute(items.insert(), rows)
        return token, Participant(pid, version, code, None)

    def participant(self, token: Optional[str]) -> Optional[Participant]:
        if not token or len(token) > 128:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(participants.c.id, participants.c.version, participants.c.completion_code,
                                         participants.c.completed_at)
                               .where(participants.c.token_sha256 == hash_token(token))).first()
        return Participant(*row) if row else None

    def external_id_taken(self, external_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(participants.c.id)
                                .where(participants.c.external_id == external_id)).first() is not None

    # ------------------------------------------------------------------------------------------------ items

    def progress(self, pid: int) -> tuple[int, int]:
        """(answered, total) for a participant."""
        with self.engine.connect() as conn:
            return self._progress(conn, pid)

    @staticmethod
    def _progress(conn: Connection, pid: int) -> tuple[int, int]:
        total = conn.execute(sa.select(sa.func.count()).select_from(items)
                             .where(items.c.participant_id == pid)).scalar_one()
        done = conn.execute(sa.select(sa.func.count()).select_from(responses)
                            .where(responses.c.participant_id == pid)).scalar_one()
        return int(done), int(total)

    def _current(self, conn: Connection, pid: int) -> Optional[Any]:
        answered = sa.select(responses.c.position).where(responses.c.participant_id == pid)
        return conn.execute(sa.select(items).where(items.c.participant_id == pid)
                            .where(items.c.position.not_in(answered)).order_by(items.c.position).limit(1)).first()

    def current_item(self, pid: int) -> tuple[Optional[Item], int, int]:
        """The first unanswered item (None when all are answered), and (answered, total). Reads only."""
        with self.engine.connect() as conn:
            row = self._current(conn, pid)
            done, total = self._progress(conn, pid)
        item = Item(pid, row.position, row.version, row.pool_index, row.eps_255, row.file) if row else None
        return item, done, total

    def answer(self, pid: int, position: int, answer: str, shown_at: Optional[str] = None,
               client_ms: Optional[int] = None) -> str:
        """Record an answer to the participant's current item (`shown_at`: when its page was served;
        `client_ms`: the response time the participant's browser measured).

        Returns "ok"; "repeat" (this exact answer is already stored: nothing written); "changed" (the item was
        answered differently: answers are final); "unassigned"; or "not_current" (a later item).
        """
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}")
        with self._write() as conn, conn.begin():
            assigned = conn.execute(sa.select(items.c.position).where(items.c.participant_id == pid)
                                    .where(items.c.position == position)).first()
            if assigned is None:
                return "unassigned"
            prev = conn.execute(sa.select(responses.c.answer).where(responses.c.participant_id == pid)
                                .where(responses.c.position == position)).scalar()
            if prev is not None:
                return "repeat" if prev == answer else "changed"
            cur = self._current(conn, pid)
            if cur is None or cur.position != position:
                return "not_current"
            t = now()
            conn.execute(responses.insert().values(participant_id=pid, position=position, answer=answer,
                                                   shown_at=shown_at, answered_at=t,
                                                   response_ms=_ms_between(shown_at, t), client_ms=client_ms))
            if self._current(conn, pid) is None:
                conn.execute(participants.update().where(participants.c.id == pid).values(completed_at=t))
        return "ok"

    # ----------------------------------------------------------------------------------------------- export

    def export_rows(self) -> Iterator[dict[str, Any]]:
        """Every answer with its item and participant, ordered by participant and position."""
        j = responses.join(items, sa.and_(responses.c.participant_id == items.c.participant_id,
                                          responses.c.position == items.c.position)) \
                     .join(participants, participants.c.id == responses.c.participant_id)
        q = (sa.select(participants.c.id, participants.c.external_id, items.c.version, items.c.position,
                       items.c.pool_index, items.c.image_id, items.c.label, items.c.eps_255,
                       items.c.still_adversarial, items.c.file, responses.c.shown_at, responses.c.answer,
                       responses.c.answered_at, responses.c.response_ms, responses.c.client_ms,
                       participants.c.started_at,
                       participants.c.completed_at, participants.c.completion_code)
             .select_from(j).order_by(participants.c.id, items.c.position))
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                said = r.answer == "perturbed"
                perturbed = r.eps_255 > 0
                yield {"participant": r.id, "external_id": r.external_id or "", "version": r.version,
                       "position": r.position, "pool_index": r.pool_index, "image_id": r.image_id,
                       "label": r.label, "eps_255": r.eps_255, "eps": round(r.eps_255 / 255, 8),
                       "perturbed": int(perturbed), "answer": r.answer, "said_perturbed": int(said),
                       "correct": int(said == perturbed), "still_adversarial": int(bool(r.still_adversarial)),
                       "file": r.file, "shown_at": r.shown_at or "", "answered_at": r.answered_at,
                       "response_ms": "" if r.response_ms is None else r.response_ms,
                       "client_ms": "" if r.client_ms is None else r.client_ms,
                       "started_at": r.started_at, "completed": int(r.completed_at is not None),
                       "completion_code": r.completion_code}

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                    for name, t in (("participants", participants), ("items", items), ("responses", responses))}

    def close(self) -> None:
        self.engine.dispose()
