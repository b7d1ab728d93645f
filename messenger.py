"""messenger: a complete messenger backend in one file.

A JSON API over HTTP for users, sessions, avatars, dialogs and groups,
messages with files, replies, edits, deletions, reactions and search, read
marks, and updates by long polling or as an event stream, built on Bottle
(routing), waitress (serving) and SQLite (storage), with nothing else.

Run it (after `pip install .`, `messenger` and `python -m messenger` are
the same program):

    python messenger.py --port 8080 --db messenger.db
    python messenger.py --demo --db :memory:    # a mock backend with demo data
    python messenger.py --fixtures my.json --test-routes   # your data; reset, faults, a request log

Embed it (for example in a test suite):

    import messenger
    with messenger.Server(db=":memory:") as server:   # a free port
        print(server.url)
        server.reset()                                # a fresh state for the next test

    app = messenger.make_app("chat.db")   # a plain WSGI application

The HTTP API is documented in README.md, route by route, and served as
OpenAPI 3.1 at GET /openapi.json, built from each route's declared contract.
"""

__version__ = "0.1.0"

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import hmac
import html
import inspect
import io
import itertools
import json
import logging
import math
import mimetypes
import os
import random
import re
import secrets
import signal
import socket
import sqlite3
import struct
import sys
import sysconfig
import threading
import time
import unicodedata
import urllib.parse
import zlib

import bottle
import waitress.channel
import waitress.server

# ---------------------------------------------------------------------------
# Limits and defaults
# ---------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_DB = "messenger.db"
DEFAULT_THREADS = 16  # a waiting long poll holds one

HOUR_SECONDS = 60 * 60
DAY_SECONDS = 24 * HOUR_SECONDS

PASSWORD_ITERATIONS = 600_000  # PBKDF2-HMAC-SHA256, as OWASP recommends
SALT_BYTES = 16
TOKEN_BYTES = 32  # 256 bits
SESSION_COOKIE = "session_id"
MAX_TOKEN_CHARS = 128  # a token is 43; a longer cookie value is not one of ours
MAX_SESSION_COOKIES = 4  # how many session_id cookies of one request are tried
SESSION_DAYS = 30
LOGIN_FAILURE_LIMIT = 10
LOGIN_FAILURE_WINDOW_SECONDS = 15 * 60

MAX_JSON_BYTES = 100 * 1024
MAX_PHOTO_BYTES = 5 * 1024 * 1024
MAX_FILE_BYTES = 10 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # what an upload's request may add to its file
MAX_MESSAGE_FILES = 10
MAX_FILE_NAME_CHARS = 255
MAX_EXTENSION_CHARS = 16  # "report.pdf" keeps ".pdf" when a long name is cut
UNSENT_FILE_SECONDS = 24 * 60 * 60  # an upload no message carries is deleted after this
FILE_CHUNK_BYTES = 256 * 1024  # files are copied in and out this much at a time
MAX_JPEG_SEGMENTS = 256  # a JPEG's size is in its frame header, after a few dozen segments at most
MAX_CLIENT_ID_CHARS = 64
RETRY_SECONDS = 24 * 60 * 60  # a send with a client_id used this recently is a retry
MAX_ID = 2**63 - 1  # SQLite's largest integer
MAX_ID_DIGITS = len(str(MAX_ID))
MIN_PASSWORD_CHARS, MAX_PASSWORD_CHARS = 8, 1024
MAX_USERNAME_CHARS = 32
USERNAME_BASE_CHARS = MAX_USERNAME_CHARS - 4  # a username made from an email leaves room for a number
MAX_SEARCH_CHARS = 64
# A search of 3+ characters sorts all its matches when they are few (about
# 3 µs each), else walks the username index in order until its page is full
# (about 0.07 µs a user passed): sorting wins up to a fiftieth of the users,
# and always up to 1000 matches.
SORTED_SEARCH_MATCHES = 1000
SORTED_SEARCH_SHARE = 50
MAX_MESSAGE_CHARS = 4096
MAX_CHAT_NAME_CHARS = 128
MAX_GROUP_MEMBERS = 100  # the owner included
SEARCH_BATCH = 5000  # messages a search indexes per transaction (about 50 ms)
MAX_EMOJI_CHARS = 16  # an emoji of several code points (a family, a flag) is still one
DEFAULT_PAGE = 50
MAX_PAGE = 100
MAX_POLL_SECONDS = 60
UPDATES_HOURS = 24  # how long updates are kept for clients that were away
# A waiting poll re-reads the database this often, to see updates written by
# another process on the same file; this process's own writes wake it at once.
POLL_RECHECK_SECONDS = 0.25
PRUNE_SECONDS = 60  # how often a process deletes expired updates (readers skip them anyway)
STREAM_SECONDS = 60  # an event stream holds a thread, so it ends after this; the browser reconnects
STREAM_HEARTBEAT_SECONDS = 15  # a comment line this often keeps proxies from closing a quiet stream
STREAM_RETRY_MS = 1000  # how long a browser waits before it reconnects
STREAM_BUSY_RETRY_MS = 5000  # the same, when the threads were too busy to keep a stream open
MAX_WAITING_PER_USER = 4  # waiting polls and streams of one user, so that one cannot crowd out others
TYPING_SHOWN_SECONDS = 10  # a typing update older than this is news no more: never answered
TYPING_REPEAT_SECONDS = 3  # a "still typing" sooner than this after the last one sends nothing
MAX_TYPING_KEPT = 10_000  # typists remembered for that, before the stale ones are forgotten

# waitress, configured on purpose:
# a body up to this many times the largest upload reaches the app, which
# answers the contract's 413 JSON with CORS headers (a browser can read
# why); only a body beyond it gets waitress's plain 413.
BODY_LIMIT_FACTOR = 4
# a worker waits while a connection has this much unsent, so that a file
# download holds about this much in memory, not the whole file (16 MiB).
OUTBUF_HIGH_WATERMARK = 1024 * 1024
# headers past 64 KiB are waitress's 431: no honest client sends that much.
MAX_HEADER_BYTES = 64 * 1024
# enough for a browser's six connections from each of many clients.
CONNECTION_LIMIT = 1000
# an idle keep-alive connection is dropped after this many seconds; above
# the longest poll so a waiting client is never cut off.
CHANNEL_TIMEOUT_SECONDS = 120
# on stop, requests under way get this long to finish and be sent.
STOP_GRACE_SECONDS = 5

# Browsers may call the API with credentials from these origins, any port.
LOCAL_ORIGIN = re.compile(r"http://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?")
CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
CORS_MAX_AGE_SECONDS = 7200  # how long a browser may keep a preflight's answer
MAX_WARNED_ORIGINS = 100  # origins warned about once each (localhost calling 127.0.0.1)
MAX_LOGGED_REQUESTS = 1000  # the request log of the test routes keeps the latest this many

DEMO_PASSWORD = "demo-password"

BUSY_TIMEOUT_SECONDS = 10  # how long a connection waits for another process's write lock
RETRY_AFTER_SECONDS = 5  # what a 503 tells a client when the database cannot be written
JSON_TYPE = "application/json"
# One encoder writes every JSON body: text as UTF-8 ("Привет", not
# "\u041f..."), without spaces, as SQLite's json_object() writes it, so a
# body's bytes do not depend on which code built it.
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

log = logging.getLogger("messenger")

# ---------------------------------------------------------------------------
# Options: what an app can be told, by keyword or by command-line flag
# ---------------------------------------------------------------------------


def parse_delay(value):
    """A --delay value, "MS" or "MIN-MAX" milliseconds (or a number, or a pair), as (min, max)."""
    if isinstance(value, (int, float)):
        low = high = value
    elif isinstance(value, (tuple, list)):
        low, high = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:-\s*(\d+(?:\.\d+)?)\s*)?", str(value))
        if not match:
            raise ValueError(f"a delay is MS or MIN-MAX milliseconds, not {value!r}")
        low, high = float(match[1]), float(match[2] or match[1])
    if not 0 <= low <= high:
        raise ValueError(f"a delay range must be 0 <= MIN <= MAX, not {value}")
    return low, high


def _mib_argument(text):
    """--max-file-mb: MiB as bytes."""
    try:
        mib = float(text)
    except ValueError:
        mib = 0
    if not mib > 0 or math.isinf(mib):
        raise argparse.ArgumentTypeError(f"a size is a positive number of MiB, not {text!r}")
    return int(mib * 1024 * 1024)


def _delay_argument(text):
    try:
        return parse_delay(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _option(default, flag_help=None, **flag):
    """An option's default, and for a command-line flag its help and argparse settings."""
    # The flag is named like the option (--allow-reset) unless `flag` gives a name.
    return dataclasses.field(default=default, metadata={"help": flag_help, "flag": flag})


@dataclasses.dataclass(frozen=True)
class Options:
    """An app's options, each defined once: make_app's keywords, and the flags of those with help."""

    threads: int = _option(DEFAULT_THREADS, f"worker threads; a waiting long poll holds one"
                                            f" (default {DEFAULT_THREADS})", type=int, metavar="N")
    demo: bool = _option(False, "fill an empty database with demo users, chats and messages,"
                                " and print their logins")
    delay: tuple = _option((0, 0), "milliseconds to wait before each answer (a fixed or a random"
                                   " delay), to exercise a client's loading states (default 0)",
                           type=_delay_argument, metavar="MS|MIN-MAX")
    cors_origins: frozenset = _option(frozenset(), "an origin (such as https://app.example.com)"
                                      " allowed to call the API from a browser with credentials,"
                                      " besides http://localhost, 127.0.0.1 and [::1] on any port;"
                                      " repeatable; '*' allows any",
                                      name="--cors-origin", action="append", metavar="ORIGIN")
    fixtures: object = _option(None, "a JSON file of users, chats and messages to fill an empty"
                                     " database with (the README shows the format); not with --demo",
                               metavar="FILE")
    allow_reset: bool = _option(False, "enable POST /__reset, which empties the database (and"
                                       " loads the demo data or the fixtures again), for clients'"
                                       " end-to-end tests")
    test_routes: bool = _option(False, "enable every test route: POST /__reset, the request log"
                                       " (/__requests) and fault rules (/__faults)")
    secure_cookies: bool = _option(False, "mark the session cookie Secure (when served behind HTTPS)")
    quiet: bool = _option(False, "no access log")
    password_iterations: int = _option(PASSWORD_ITERATIONS)  # tests lower it
    session_days: float = _option(SESSION_DAYS)
    max_file_bytes: int = _option(MAX_FILE_BYTES, f"the largest attachment, in MiB"
                                                  f" (default {MAX_FILE_BYTES // 1024 // 1024})",
                                  name="--max-file-mb", type=_mib_argument, metavar="MIB")
    max_photo_bytes: int = _option(MAX_PHOTO_BYTES)
    updates_hours: float = _option(UPDATES_HOURS)
    stream_seconds: float = _option(STREAM_SECONDS)  # tests shorten both
    stream_heartbeat_seconds: float = _option(STREAM_HEARTBEAT_SECONDS)

    def __post_init__(self):
        """Check the values, and keep the delay as (min, max) and the origins as a set."""
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.max_file_bytes < 1 or self.max_photo_bytes < 1:
            raise ValueError("upload limits must be at least 1 byte")
        if self.demo and self.fixtures is not None:
            raise ValueError("--fixtures and --demo do not go together: the demo is fixtures of its own")
        object.__setattr__(self, "delay", parse_delay(self.delay))
        object.__setattr__(self, "cors_origins", frozenset(self.cors_origins))


# ---------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------

SCHEMA_VERSION = 4


def _schema_path():
    """Find schema.sql: beside this file, or where `pip install` put it."""
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql")
    if os.path.exists(beside):
        return beside
    return os.path.join(sysconfig.get_path("data"), "share", "messenger", "schema.sql")


def _schema_scripts():
    """schema.sql in parts: the schema, {version: upgrade step}, search tables with FTS5 and without."""
    with open(_schema_path(), encoding="utf-8") as f:
        schema, _, rest = f.read().partition("-- upgrades\n")
    upgrades, _, search = rest.partition("-- search-index\n")
    with_fts5, _, without_fts5 = search.partition("-- no-search-index\n")
    parts = re.split(r"^-- upgrade to (\d+)\b.*$", upgrades, flags=re.M)[1:]
    steps = {int(version): step for version, step in zip(parts[::2], parts[1::2])}
    return schema, steps, with_fts5, without_fts5


def _statements(script):
    """The SQL statements of a script, one by one (a trigger's body stays whole)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


def _has_fts5_trigram(conn):
    """Whether this SQLite can build FTS5 trigram indexes."""
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.probe USING fts5 (x, tokenize = 'trigram')")
    except sqlite3.OperationalError:
        return False
    conn.execute("DROP TABLE temp.probe")
    return True


class Unavailable(Exception):
    """The database cannot be written now: its file was deleted or replaced, or its disk is full."""


# What SQLite says when the fault is the disk's or the file's, not the code's.
UNAVAILABLE_ERRORS = ("database or disk is full", "disk I/O error", "unable to open database file",
                      "attempt to write a readonly database", "database is locked")


def _is_unavailable(exc):
    return isinstance(exc, Unavailable) or (
        isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(UNAVAILABLE_ERRORS))


class Database:
    """SQLite connections for one app, shared safely by the server's threads."""

    # A connection is borrowed for one piece of work and given back, so a
    # thread that waits (a long poll) holds none.

    def __init__(self, path):
        self.file = None  # (device, inode) of the database file, once it is open
        if path == ":memory:":
            # Each plain ":memory:" connection gets its own empty database;
            # the memdb VFS lets all of this app's connections share one.
            self.target, self.uri = f"file:/messenger-{secrets.token_hex(8)}?vfs=memdb", True
        else:
            self.target, self.uri = path, False
        self.path = path
        self._idle = []
        self.borrowed = 0  # connections out of the pool right now
        self._lock = threading.Lock()
        # Writers of this process queue here and are woken at once; SQLite's
        # busy timeout, which sleeps and retries, is left for other processes.
        self._write_lock = threading.Lock()
        self._writer = None  # the connection of every write transaction, once one ran
        self._closed = False
        conn = self._open()
        try:
            if not self.uri:
                conn.execute("PRAGMA journal_mode = WAL")
                # From now on the file is never created again: a connection
                # opened after it was deleted would silently start an empty
                # database, and one to a replaced file would write to another.
                self.file = self._identity()
                self.target, self.uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw", True
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)

    def _identity(self):
        """The database file's (device, inode); Unavailable when it is gone."""
        try:
            stat = os.stat(self.path)
        except OSError:
            raise Unavailable(f"the database file {self.path} is gone") from None
        return stat.st_dev, stat.st_ino

    def _check_file(self):
        """Raise Unavailable unless the database file is still the one this app opened."""
        if self.file is not None and self._identity() != self.file:
            raise Unavailable(f"the database file {self.path} was replaced")

    def _open(self):
        self._check_file()
        conn = sqlite3.connect(
            self.target,
            uri=self.uri,
            timeout=BUSY_TIMEOUT_SECONDS,
            isolation_level=None,  # transactions are begun explicitly
            check_same_thread=False,  # a pooled connection moves between threads
        )
        conn.row_factory = sqlite3.Row
        conn.create_function("fold", 1, _fold, deterministic=True)
        conn.create_function("starts_words", 2, _starts_words, deterministic=True)  # search without FTS5
        conn.create_function("search_words", 1, _name_key, deterministic=True)  # schema.sql's upgrade
        conn.execute("PRAGMA foreign_keys = ON")  # outside any transaction, or it stays off
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: survives a crash of the process
        return conn

    def _migrate(self, conn):
        """Create the schema on a new database, or bring an older one up to date."""
        # Off while tables are rebuilt (only outside a transaction does it take).
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("BEGIN IMMEDIATE")  # another process may be doing the same
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"the database has schema version {version}; this messenger knows {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                schema, upgrades, with_fts5, without_fts5 = _schema_scripts()
                script = schema if version == 0 else "".join(
                    upgrades[step] for step in range(version + 1, SCHEMA_VERSION + 1))
                script += with_fts5 if _has_fts5_trigram(conn) else without_fts5
                for statement in _statements(script):
                    conn.execute(statement)
                if conn.execute("PRAGMA foreign_key_check").fetchone():
                    raise sqlite3.IntegrityError("the upgraded database breaks a foreign key")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA foreign_keys = ON")
        self.search_index = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'users_search'"
        ).fetchone() is not None

    @contextlib.contextmanager
    def connection(self):
        """Borrow a connection; reads run in SQLite's autocommit mode."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        with self._lock:
            self.borrowed += 1
        try:
            yield conn
        finally:
            with self._lock:
                self.borrowed -= 1
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)

    @contextlib.contextmanager
    def transaction(self):
        """The writer connection inside BEGIN IMMEDIATE: commit, or roll back on error."""
        # One connection writes for the whole app: a commit empties the page
        # cache of every other connection, but not the committer's own.
        with self._write_lock:
            if self._writer is None:
                self._writer = self._open()
            conn = self._writer
            # IMMEDIATE takes the write lock up front, so two writers queue
            # on busy_timeout instead of failing with "database is locked".
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._check_file()  # writes to a deleted file would be lost
                yield conn
                conn.execute("COMMIT")  # a full disk may fail it: then nothing is written
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self):
        """Close every idle connection and the writer, and each borrowed one when it comes back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None


# ---------------------------------------------------------------------------
# Errors, requests and responses
# ---------------------------------------------------------------------------


def _error_body(mnemonic, message, field=None):
    body = {"error": mnemonic, "message": message}
    if field is not None:
        body["field"] = field
    return _to_json(body)


def error(status, mnemonic, message, field=None, headers=None):
    """Build the one JSON error response; handlers raise it."""
    return bottle.HTTPResponse(
        _error_body(mnemonic, message, field), status, headers, content_type=JSON_TYPE
    )


def _invalid(field, message):
    return error(400, "invalid_field", message, field)


def _missing(field):
    return error(400, "missing_field", f"The field '{field}' is required.", field)


def _user_not_found(field=None):
    return error(400, "user_not_found", "There is no user with this id.", field)


def _chat_not_found():
    # Also for a chat the caller is not in: its existence is not revealed.
    return error(400, "chat_not_found", "There is no chat with this id.")


_BOTTLE_ERRORS = {
    404: ("not_found", "There is no such route."),
    405: ("method_not_allowed", "This route does not accept that method."),
    413: ("payload_too_large", "The request body is too large."),
    500: ("internal_error", "The server failed; the error has been logged."),
}


def _bottle_error_page(app, err):
    """Turn an error raised by Bottle itself (routing, a crash) into the JSON shape."""
    mnemonic, message = _BOTTLE_ERRORS.get(
        err.status_code, ("invalid_field", "The request is malformed.")
    )
    bottle.response.content_type = JSON_TYPE
    _add_cors_headers(app)  # a crash skips the after_request hook
    return _error_body(mnemonic, message)


def _check_path_encoding():
    """Refuse a path that is not UTF-8 (Bottle would silently drop the bad bytes)."""
    try:
        bottle.request.environ["bottle.raw_path"].encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise error(400, "invalid_field", "The request path is not valid UTF-8.", "path") from None


def _header(name, default=""):
    """A request header as it came, its bytes as Latin-1 (Bottle's get_header raises on non-UTF-8)."""
    return bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"), default)


def _cors_origin(allowed):
    """The request's Origin if it is local or `allowed` to call the API with credentials, else None."""
    origin = bottle.request.environ.get("HTTP_ORIGIN")
    if origin and (LOCAL_ORIGIN.fullmatch(origin) or origin in allowed or "*" in allowed):
        return origin
    return None


def _add_cors_headers(app):
    """Let an allowed origin read this answer, errors included (an after_request hook)."""
    bottle.response.set_header("Vary", "Origin")
    origin = _cors_origin(app.options.cors_origins)
    if origin:
        bottle.response.set_header("Access-Control-Allow-Origin", origin)
        bottle.response.set_header("Access-Control-Allow-Credentials", "true")
        bottle.response.set_header("Access-Control-Expose-Headers", "Retry-After, ETag")
        _warn_cross_site(app.warned_origins, origin)


def _warn_cross_site(warned, origin):
    """Warn once per origin when a page on localhost calls 127.0.0.1, or the other way round."""
    hosts = {urllib.parse.urlsplit(origin).hostname,
             urllib.parse.urlsplit("//" + _header("Host")).hostname}
    # Bounded: an invented Origin per request must not grow the log and the set without end.
    if hosts == {"localhost", "127.0.0.1"} and origin not in warned and len(warned) < MAX_WARNED_ORIGINS:
        warned.add(origin)
        log.warning(
            "warning: a page on %s calls this server as %s. Browsers treat localhost and "
            "127.0.0.1 as different sites and drop the session cookie: use the same name in both.",
            origin, _header("Host"),
        )


def _answer_preflight(options):
    """Answer a CORS preflight (any OPTIONS request) with 204, before routing."""
    if bottle.request.method != "OPTIONS":
        return
    headers = {}
    if _cors_origin(options.cors_origins):
        headers = {
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": _header("Access-Control-Request-Headers"),
            "Access-Control-Max-Age": str(CORS_MAX_AGE_SECONDS),
        }
    raise bottle.HTTPResponse(status=204, headers=headers)


def _delay_response(options):
    """Wait as --delay says before answering, so clients can show their loading states."""
    low, high = options.delay
    if high and bottle.request.method != "OPTIONS":
        time.sleep(random.uniform(low, high) / 1000)


def _json_body():
    """The request body as a JSON object, whatever its Content-Type; empty means {}."""
    declared = bottle.request.content_length  # -1 for a chunked body: read at most one byte too many
    raw = b"" if declared > MAX_JSON_BYTES else bottle.request.body.read(MAX_JSON_BYTES + 1)
    if declared > MAX_JSON_BYTES or len(raw) > MAX_JSON_BYTES:
        raise error(413, "payload_too_large", f"JSON bodies are limited to {MAX_JSON_BYTES} bytes.")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise error(400, "invalid_json", "The body is not valid UTF-8 JSON.") from None
    if not isinstance(body, dict):
        raise error(400, "invalid_json", "The body must be a JSON object.")
    return body


def _integer(text, low, high):
    """The integer that `text` writes in ASCII digits if it lies in [low, high], else None."""
    # Not int(): it takes "-5", " 5", "1_000" and "１２" (full-width digits).
    if text.isascii() and text.isdigit() and len(text) <= MAX_ID_DIGITS and low <= int(text) <= high:
        return int(text)
    return None


def _path_id(text, field="id"):
    """An id from the path: 1 to 2**63-1 (Bottle's int filter takes -5 and "１２")."""
    value = _integer(text, 1, MAX_ID)
    if value is None:
        raise _invalid(field, f"The {field} in the path must be a positive integer.")
    return value


def _search_text(text):
    """The text of a search (a user's or a message's): at most MAX_SEARCH_CHARS, no control characters."""
    if len(text) > MAX_SEARCH_CHARS:
        raise _invalid("query", f"A search is at most {MAX_SEARCH_CHARS} characters long.")
    if _has_control(text):
        raise _invalid("query", "A search must not contain control characters.")
    return text


def _query_int(name, schema):
    """An integer query parameter, checked by the schema that describes it (range; default if absent)."""
    text = bottle.request.query.get(name)
    if text is None:
        return schema.get("default")
    low, high = schema["minimum"], schema["maximum"]
    value = _integer(text, low, high)
    if value is None:
        raise _invalid(name, f"'{name}' must be an integer from {low} to {high}.")
    return value


def _json_int(body, field, required=True):
    """An id from a JSON body: an integer (not a bool), 1 to 2**63-1."""
    value = body.get(field)
    if value is None:
        if required:
            raise _missing(field)
        return None
    if type(value) is not int or not 1 <= value <= MAX_ID:
        raise _invalid(field, f"'{field}' must be a positive integer.")
    return value


def _iso(timestamp):
    """Unix time as the API's time stamp: ISO 8601, UTC, milliseconds."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------------------
# Passwords and sessions
# ---------------------------------------------------------------------------


def hash_password(password, iterations=PASSWORD_ITERATIONS, salt=None):
    """Hash a password with PBKDF2-HMAC-SHA256 and a random salt, parameters included."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_password(password, stored):
    """Check a password against a stored hash in constant time."""
    try:
        scheme, iterations, salt, _ = stored.split("$")
        iterations, salt = int(iterations), bytes.fromhex(salt)
    except ValueError:
        return False
    if scheme != "pbkdf2_sha256":
        return False
    return hmac.compare_digest(hash_password(password, iterations, salt), stored)


def _hash_iterations(stored):
    return int(stored.split("$")[1])


def _token_hash(token):
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _session_cookies():
    """Every session_id value in the Cookie header, read leniently."""
    # Bottle's cookie parser drops the whole header when one pair is malformed,
    # and keeps only the last of two cookies with the same name.
    header = bottle.request.environ.get("HTTP_COOKIE", "")
    values = []
    for pair in header.split(";"):
        name, _, value = pair.strip().partition("=")
        value = value.strip().strip('"')
        if name == SESSION_COOKIE and value.isascii() and 0 < len(value) <= MAX_TOKEN_CHARS:
            values.append(value)
    return values[:MAX_SESSION_COOKIES]


# `user` is the caller's own user object as JSON text, for the routes that show it.
Session = collections.namedtuple("Session", "user_id token_hash user")
OWN_USER = ("json_object('id', u.id, 'email', u.email, 'username', u.username, 'name', u.name,"
            " 'status', u.status, 'phone', u.phone)")


def _session(db, with_user=False):
    """The request's live session (with the user, in the same statement), or raise 401."""
    now = time.time()
    sql = ("SELECT s.user_id, " + OWN_USER + " FROM sessions AS s JOIN users AS u ON u.id = s.user_id"
           if with_user else "SELECT s.user_id, NULL FROM sessions AS s")
    sql += " WHERE s.token_hash = ? AND s.expires_at > ?"
    with db.connection() as conn:
        for token in _session_cookies():
            token_hash = _token_hash(token)
            row = conn.execute(sql, (token_hash, now)).fetchone()
            if row:
                return Session(row[0], token_hash, row[1])
    raise error(401, "not_authorized", "Log in first: no valid session cookie came with the request.")


def _session_lives(db, session):
    """Whether a session is still live (an open event stream asks now and then)."""
    with db.connection() as conn:
        return _exists(conn, "SELECT 1 FROM sessions WHERE token_hash = ? AND expires_at > ?",
                       (session.token_hash, time.time()))


def _set_session_cookie(options, token):
    bottle.response.set_cookie(SESSION_COOKIE, token, max_age=options.session_days * DAY_SECONDS,
                               **_cookie_attributes(options))


def _expire_session_cookie(options):
    bottle.response.delete_cookie(SESSION_COOKIE, **_cookie_attributes(options))


def _cookie_attributes(options):
    return {"path": "/", "httponly": True, "samesite": "lax", "secure": options.secure_cookies}


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _has_control(text, allowed=""):
    return any(unicodedata.category(c) == "Cc" and c not in allowed for c in text)


def _has_visible(text):
    """Whether text shows something: a character that is not white space, a format
    character (zero-width spaces and joiners, direction marks, a BOM) or a combining mark."""
    return any(not c.isspace() and unicodedata.category(c)[0] != "M" and unicodedata.category(c) != "Cf"
               for c in text)


# The bidirectional overrides and isolates: "\u202egnp.exe" shows as "exe.png".
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _refuse_bidi_controls(field, text):
    """Raise invalid_field if a name holds a bidirectional override or isolate."""
    if not BIDI_CONTROLS.isdisjoint(text):
        raise _invalid(field, f"'{field}' must not contain bidirectional overrides or isolates.")


def _string(body, field, required):
    """A string field: None when absent or null; refuses other types, NUL and lone surrogates."""
    value = body.get(field)
    if value is None:
        if required:
            raise _missing(field)
        return None
    if not isinstance(value, str):
        raise _invalid(field, f"'{field}' must be a string.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(field, f"'{field}' is not valid Unicode text.") from None
    if "\0" in value:
        raise _invalid(field, f"'{field}' must not contain NUL characters.")
    return value


def _fold(text):
    """Text as names are compared: NFC-normalised, then case-folded."""
    # NFC: "й" typed as one character and as и + U+0306 is one letter;
    # case folding: "Ёж" and "ёж" are one name. Folding can undo NFC, hence twice.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


def _search_fold(text):
    """Text as a search compares it: folded, and ё read as е, as Russian is written both ways."""
    return _fold(text).replace("ё", "е")


def _search_words(text):
    """The words of a text as a search sees them: folded, then runs of letters, digits and marks."""
    # The categories of FTS5's tokenizer in schema.sql: L*, N*, M* and Co.
    return "".join(c if unicodedata.category(c)[0] in "LNM" or unicodedata.category(c) == "Co" else " "
                   for c in _search_fold(text)).split()


def _name_key(name):
    """A name's words, as users.name_key keeps them for a search."""
    return " ".join(_search_words(name))


def _visible_text(body, field, longest, allowed=""):
    """Required text: 1 to `longest` characters, one of them visible, no control characters but
    `allowed` (message text), or none at all and no bidirectional overrides (a group's name)."""
    value = _string(body, field, required=True)
    if _has_control(value, allowed):
        raise _invalid(field, f"'{field}' must not contain control characters"
                              + (" other than tab and newlines." if allowed else "."))
    if not allowed:
        _refuse_bidi_controls(field, value)
    if not 1 <= len(value) <= longest:
        raise _invalid(field, f"'{field}' must be 1 to {longest} characters long.")
    if not _has_visible(value):
        raise _invalid(field, f"'{field}' must have a visible character, not only white space"
                              " or invisible ones.")
    return value


def _is_username_char(c):
    return c.isalpha() or c.isdecimal() or c in "_."


PHONE_PATTERN = "[0-9 +()-]*"  # ASCII digits, spaces, + - ( ): also the API description's pattern

# field: (shortest, longest, a check of the characters and its complaint)
USER_FIELDS = {
    "email": (3, 254, lambda v: (
        v.count("@") == 1 and not v.startswith("@") and not v.endswith("@")
        and not any(c.isspace() for c in v)
    ), "must be an address with one '@' and no spaces"),
    "username": (1, MAX_USERNAME_CHARS, lambda v: (
        all(_is_username_char(c) for c in v) and not v.isdecimal()
    ), "may hold letters, digits, '_' and '.', and not only digits"),
    "name": (0, 128, None, ""),
    "status": (0, 256, None, ""),
    "phone": (0, 32, lambda v: re.fullmatch(PHONE_PATTERN, v),
              "may hold digits, spaces, '+', '-', '(' and ')'"),
}


def _user_field(body, field, required):
    """One profile field checked against USER_FIELDS; None when absent or null."""
    value = _string(body, field, required)
    if value is None:
        return None
    if field == "email":  # a phone keyboard adds a space after it
        value = value.strip()
    if field in ("email", "username"):  # names compared and shown as one form
        value = unicodedata.normalize("NFC", value)
    shortest, longest, check, rule = USER_FIELDS[field]
    if _has_control(value):
        raise _invalid(field, f"'{field}' must not contain control characters.")
    if field in ("name", "status"):
        _refuse_bidi_controls(field, value)
    if not shortest <= len(value) <= longest:
        raise _invalid(field, f"'{field}' must be {shortest} to {longest} characters long.")
    if check and value and not check(value):
        raise _invalid(field, f"'{field}' {rule}.")
    return value


def _password(body, required):
    value = _string(body, "password", required)
    if value is not None and not MIN_PASSWORD_CHARS <= len(value) <= MAX_PASSWORD_CHARS:
        raise _invalid("password", f"'password' must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS}"
                                   " characters long.")
    return value


def _username_from_email(email):
    """A username base from an email's local part, as registration makes one."""
    base = "".join(c for c in email.split("@")[0] if _is_username_char(c))[:USERNAME_BASE_CHARS]
    return base if base and not base.isdecimal() else "user" + base


# ---------------------------------------------------------------------------
# The API's objects and bodies, as JSON Schema (for GET /openapi.json)
# ---------------------------------------------------------------------------

# Each route declares its body, query, answer and errors with these, beside
# its handler; openapi_document() builds the API's description from them.
ERROR_STATUS = {
    "invalid_json": 400, "missing_field": 400, "invalid_field": 400, "email_taken": 400,
    "username_taken": 400, "wrong_credentials": 400, "user_not_found": 400, "chat_not_found": 400,
    "message_not_found": 400, "file_not_found": 400, "invalid_image": 400, "not_authorized": 401,
    "forbidden": 403, "not_found": 404, "method_not_allowed": 405, "payload_too_large": 413,
    "range_not_satisfiable": 416, "too_many_attempts": 429,
    "internal_error": 500, "unavailable": 503,
    # the test routes' (not in the API description): a bad reset body, and a fault rule's answer (any status)
    "invalid_fixtures": 400, "injected_fault": 500,
}


def _text(min_length=0, max_length=None, **rules):
    schema = {"type": "string", "minLength": min_length, **rules}
    if max_length is not None:
        schema["maxLength"] = max_length
    return schema


def _object(required=(), **properties):
    """A JSON object of these properties and no others."""
    return {"type": "object", "required": list(required), "properties": properties,
            "additionalProperties": False}


def _body(required=(), **properties):
    """A JSON body of these properties; unknown keys are ignored, as the contract says."""
    return {"type": "object", "required": list(required), "properties": properties}


def _nullable(schema):
    """A field for which null means absent."""
    return {"oneOf": [schema, {"type": "null"}]}


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
TIME = {"type": "string", "format": "date-time"}
TEXT = _text(1, MAX_MESSAGE_CHARS, description="Not only white space; no control characters but tab,"
                                               " line feed and carriage return.")
USER_FIELD_SCHEMAS = {  # from the rules the fields are checked by
    field: _text(shortest, longest, **({"description": f"It {rule}."} if rule else {}))
    for field, (shortest, longest, _, rule) in USER_FIELDS.items()
}
USER_FIELD_SCHEMAS["phone"]["pattern"] = f"^{PHONE_PATTERN}$"
CLIENT_ID_PATTERN = "[!-~]+"  # printable ASCII, no space: also the API description's pattern
CLIENT_ID = _text(1, MAX_CLIENT_ID_CHARS, pattern=f"^{CLIENT_ID_PATTERN}$",
                  description="Chosen by the sender's client: a retry with it sends nothing again.")
SCHEMAS = {
    "User": _object(["id", *USER_FIELDS], id=ID, **dict(USER_FIELD_SCHEMAS, email={"oneOf": [
        USER_FIELD_SCHEMAS["email"], {"const": "", "description": "Hidden: email and phone are shown"
                                                                  " to those the user has written to."}]})),
    "File": _object(
        ["id", "name", "content_type", "size", "width", "height", "url", "created_at"],
        id=ID, name=_text(1, MAX_FILE_NAME_CHARS), content_type=_text(3, description="type/subtype"),
        size={"type": "integer", "minimum": 1},
        width={"type": ["integer", "null"], "minimum": 1, "description": "Of an image; else null."},
        height={"type": ["integer", "null"], "minimum": 1, "description": "Of an image; else null."},
        url=_text(1, description="Where GET downloads it: /files/{id}."), created_at=TIME),
    "Message": _object(
        ["id", "chat_id", "author_id", "text", "files", "reply_to_id", "client_id", "created_at", "edited_at",
         "reactions"],
        id=ID, chat_id=ID, author_id=ID, text=dict(TEXT, minLength=0, description=TEXT["description"]
                                                   + " Empty only in a message with files."),
        files={"type": "array", "items": _ref("File"), "maxItems": MAX_MESSAGE_FILES},
        reply_to_id={"oneOf": [ID, {"type": "null"}], "description": "The message this one answers."},
        client_id={"oneOf": [CLIENT_ID, {"type": "null"}]},
        created_at=TIME, edited_at={"type": ["string", "null"], "format": "date-time"},
        reactions={"type": "object", "description": "Each emoji in use: the ids of its users, ascending.",
                   "additionalProperties": {"type": "array", "items": ID, "minItems": 1}}),
    "Chat": _object(
        ["id", "type", "name", "members", "owner_id", "last_message", "unread_count", "last_read_id",
         "others_read_id", "created_at"],
        id=ID, type={"type": "string", "enum": ["dialog", "group"]}, name=_text(0, MAX_CHAT_NAME_CHARS),
        members={"type": "array", "items": ID, "minItems": 1, "maxItems": MAX_GROUP_MEMBERS},
        owner_id={"oneOf": [ID, {"type": "null"}]},
        last_message={"oneOf": [_ref("Message"), {"type": "null"}]},
        unread_count={"type": "integer", "minimum": 0},
        last_read_id={"type": "integer", "minimum": 0, "description": "The caller's read mark (0: none)."},
        others_read_id={"type": "integer", "minimum": 0,
                        "description": "The highest read mark of the other members."},
        created_at=TIME),
    "Update": {"oneOf": [
        _object(["update_id", "type", *rest], update_id=ID, type={"const": kind},
                **fields)
        for kind, rest, fields in [
            ("message", ["message"], {"message": _ref("Message")}),
            ("message_edited", ["message"], {"message": _ref("Message")}),
            ("message_deleted", ["chat_id", "message_id"], {"chat_id": ID, "message_id": ID}),
            ("reaction", ["chat_id", "message_id", "user_id", "emoji"],
             {"chat_id": ID, "message_id": ID, "user_id": ID,
              "emoji": {"oneOf": [_text(1, MAX_EMOJI_CHARS), {"type": "null"}]}}),
            ("read", ["chat_id", "user_id", "message_id"], {"chat_id": ID, "user_id": ID, "message_id": ID}),
            ("chat", ["chat"], {"chat": _ref("Chat")}),
            ("chat_removed", ["chat_id"], {"chat_id": ID}),
            ("user", ["user"], {"user": _ref("User")}),
            ("typing", ["chat_id", "user_id", "typing"],
             {"chat_id": ID, "user_id": ID, "typing": {"type": "boolean"}}),
        ]
    ]},
    "Error": {"type": "object", "required": ["error", "message"], "additionalProperties": False,
              "properties": {"error": {"type": "string", "enum": list(ERROR_STATUS)},
                             "message": {"type": "string"},
                             "field": {"type": "string"}}},
}
EMPTY = _object()
USER_LIST = _object(["users"], users={"type": "array", "items": _ref("User")})
MESSAGE_PAGE = _object(["messages", "has_more"], messages={"type": "array", "items": _ref("Message")},
                       has_more={"type": "boolean"})
# Query parameters, each one schema that both describes it and checks it (_query_int).
PAGE_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE}
UPDATES_LIMIT = dict(PAGE_LIMIT, default=MAX_PAGE)
OFFSET = {"type": "integer", "minimum": 0, "maximum": MAX_ID, "default": 0}
AFTER = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
TIMEOUT = {"type": "integer", "minimum": 0, "maximum": MAX_POLL_SECONDS, "default": 0}
LAST_EVENT_ID = {"type": "integer", "minimum": 0, "maximum": MAX_ID - 1}
REQUEST_LOG_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_LOGGED_REQUESTS, "default": 100}
EDIT_BODY = _body(["text"], text=dict(TEXT, minLength=0, description=TEXT["description"]
                                      + " Empty only in a message with files."))
SEND_BODY = _body(
    [], text=_nullable(dict(TEXT, minLength=0, description=TEXT["description"]
                            + " Required unless file_ids names a file; then it may be empty.")),
    file_ids=_nullable({"type": "array", "items": ID, "maxItems": MAX_MESSAGE_FILES, "uniqueItems": True,
                        "description": "Files the caller uploaded (POST /files), in this order."}),
    reply_to_id=_nullable(dict(ID, description="A message of this chat that this one answers.")),
    client_id=_nullable(CLIENT_ID))
NAME = _text(1, MAX_CHAT_NAME_CHARS, description="Not only white space; no control characters.")
USER_ID_BODY = _body(["user_id"], user_id=ID)
PROFILE_FIELDS = {field: _nullable(schema) if field not in ("email", "username")
                  else schema for field, schema in USER_FIELD_SCHEMAS.items()}
PASSWORD = _text(MIN_PASSWORD_CHARS, MAX_PASSWORD_CHARS)
NOT_MODIFIED = {"description": "Not modified: the If-None-Match ETag is current."}
BINARY = {"type": "string", "format": "binary"}


@dataclasses.dataclass(frozen=True)
class Contract:
    """What a route takes and answers: its session rule, and its part of GET /openapi.json."""

    public: bool = False  # True: no session needed
    body: dict = None  # the JSON body's schema
    upload: dict = None  # a multipart/form-data body's schema
    query: dict = None  # {name: schema} of the query parameters
    path_params: dict = None  # {name: schema} of path parameters that are not ids
    headers: dict = None  # {name: schema} of request headers it reads
    returns: dict = dataclasses.field(default_factory=lambda: EMPTY)  # the JSON answer's schema
    media: dict = None  # {media type: schema} of answers that are not JSON
    answers: dict = None  # {status: OpenAPI response} of successes other than 200
    errors: tuple = ()  # its mnemonics, besides those of bad ids and bodies and of sessions


# ---------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------

ROUTES = []  # (method, path, handler, Contract) in the order of the contract; make_app installs them


def route(method, path, **contract):
    """Declare a handler for make_app, with its Contract; its docstring describes it on GET /."""

    def declare(handler):
        ROUTES.append((method, path, handler, Contract(**contract)))
        return handler

    return declare


class _Context:
    """A Bottle plugin: each handler gets what its parameters name: `app`, `db`, `me`, `session`, `caller`."""

    # As Bottle's own sqlite plugin passes `db`. `me` (the caller's id),
    # `session` and `caller` (the caller's own user object, as JSON text) exist
    # on routes that need a session, which is checked here, before the
    # handler runs, so that the rule lives in one place.

    name, api = "context", 2

    def apply(self, handler, route):
        wants = inspect.signature(handler).parameters
        contract = route.config.get("contract") or Contract()
        app, public = route.app, contract.public
        given = {name: value for name, value in (("app", app), ("db", app.db)) if name in wants}

        def with_context(**path_args):
            context = dict(given)
            try:
                if not public:
                    session = _session(app.db, with_user="caller" in wants)
                    if "caller" in wants:
                        context["caller"] = session.user
                    if "me" in wants:
                        context["me"] = session.user_id
                    if "session" in wants:
                        context["session"] = session
                return handler(**path_args, **context)
            except (Unavailable, sqlite3.OperationalError) as exc:
                if not _is_unavailable(exc):
                    raise
                log.error("messenger: %s", exc)
                raise error(503, "unavailable", "The database cannot be written now; try again soon.",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

        return with_context


def _user_json(row):
    """The caller's own user object."""
    return {key: row[key] for key in ("id", *USER_FIELDS)}


# Whether `viewer` may see the email and phone of `user` (SQL, of two columns
# or parameters): they share a chat in which `user` has written.
CONTACT_SHOWN = (
    "({user} = {viewer} OR EXISTS (SELECT 1 FROM chat_members AS mine JOIN chat_members AS theirs"
    " ON theirs.chat_id = mine.chat_id WHERE mine.user_id = {viewer} AND theirs.user_id = {user}"
    " AND theirs.posted > 0))"
)
# Users as `viewer` sees them: {where} picks them from users AS x, and
# USER_OBJECT writes the JSON of each.
SHOWN_USERS = "SELECT x.*, " + CONTACT_SHOWN.format(user="x.id", viewer="{viewer}") + " AS shown" \
              " FROM users AS x WHERE {where}"
USER_OBJECT = ("json_object('id', id, 'email', CASE WHEN shown THEN email ELSE '' END,"
               " 'username', username, 'name', name, 'status', status,"
               " 'phone', CASE WHEN shown THEN phone ELSE '' END)")


def _users_json(conn, me, user_ids):
    """The JSON texts of these users as `me` sees them, in the order given."""
    found = dict(conn.execute(
        "SELECT id, " + USER_OBJECT + " FROM ("
        + SHOWN_USERS.format(viewer="?", where="x.id IN (SELECT value FROM json_each(?))") + ")",
        (me, me, _to_json(user_ids)),
    ).fetchall())
    return [found[user_id] for user_id in user_ids if user_id in found]


def _user_list(users):
    """Answer {"users": [...]} of JSON texts from _users_json."""
    return _json_text('{"users":[' + ",".join(users) + "]}")


def _load_user(conn, user_id):
    return conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()


def _taken(conn, email=None, username=None, except_id=0):
    """Raise email_taken or username_taken if another user has either."""
    if email is not None and conn.execute(
        "SELECT 1 FROM users WHERE email_key = ? AND id <> ?", (_fold(email), except_id)
    ).fetchone():
        raise error(400, "email_taken", "A user with this email already exists.", "email")
    if username is not None and conn.execute(
        "SELECT 1 FROM users WHERE username_key = ? AND id <> ?", (_fold(username), except_id)
    ).fetchone():
        raise error(400, "username_taken", "This username is already taken.", "username")


def _free_username(conn, base):
    """base, or base with the smallest number from 2 that no one has."""
    candidate, number = base, 2
    while conn.execute(
        "SELECT 1 FROM users WHERE username_key = ?", (_fold(candidate),)
    ).fetchone():
        suffix = str(number)
        candidate, number = base[: MAX_USERNAME_CHARS - len(suffix)] + suffix, number + 1
    return candidate


def _insert_user(conn, email, username, password_hash, name="", status="", phone="", created_at=None):
    """Store a new user; their id."""
    return conn.execute(
        "INSERT INTO users (email, email_key, username, username_key, name, name_key, status, phone,"
        " password_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (email, _fold(email), username, _fold(username), name, _name_key(name), status, phone,
         password_hash, created_at or _iso(time.time())),
    ).lastrowid


REGISTRATION = _body(["email", "password"], **{field: schema if field == "email" else _nullable(schema)
                                                for field, schema in USER_FIELD_SCHEMAS.items()},
                     password=PASSWORD)
REGISTRATION_ERRORS = ("missing_field", "invalid_field", "email_taken", "username_taken")


@route("POST", "/sign_up", public=True, body=REGISTRATION, returns=_ref("User"), errors=REGISTRATION_ERRORS)
@route("POST", "/users", public=True, body=REGISTRATION, returns=_ref("User"), errors=REGISTRATION_ERRORS)
def register(app, db):
    """Register a user: email and password, optionally username, name, status, phone."""
    body = _json_body()
    fields = {field: _user_field(body, field, field == "email") for field in USER_FIELDS}
    password = _password(body, required=True)
    password_hash = hash_password(password, app.options.password_iterations)
    email = fields["email"]
    with db.transaction() as conn:
        _taken(conn, email=email, username=fields["username"] or None)
        username = fields["username"] or _free_username(conn, _username_from_email(email))
        user_id = _insert_user(conn, email, username, password_hash, fields["name"] or "",
                               fields["status"] or "", fields["phone"] or "")
        return _user_json(_load_user(conn, user_id))


@route("POST", "/login", public=True, body=_body(["email", "password"], email=_text(), password=_text()),
       returns=_ref("User"),
       errors=("missing_field", "invalid_field", "wrong_credentials", "too_many_attempts"))
def login(app, db):
    """Log in with email and password: the user, and the session cookie."""
    body = _json_body()
    email = _string(body, "email", required=True)
    password = _string(body, "password", required=True)
    user = _check_login(app.options, db, _fold(email.strip()), password)
    token = _start_session(app.options, db, user, password)
    _set_session_cookie(app.options, token)
    return _user_json(user)


def _check_login(options, db, email_key, password):
    """The user with this email and password, or raise too_many_attempts or wrong_credentials."""
    now = time.time()
    with db.connection() as conn:
        retry_after = _login_retry_after(conn, email_key, now)
        user = conn.execute("SELECT * FROM users WHERE email_key = ?", (email_key,)).fetchone()
    if retry_after:
        raise error(429, "too_many_attempts", "Too many failed logins for this email; try again later.",
                    headers={"Retry-After": str(retry_after)})
    if user is None:  # an unknown email costs the time a wrong password does
        hash_password(password, options.password_iterations)
    if user is None or not verify_password(password, user["password_hash"]):
        with db.transaction() as conn:
            conn.execute("DELETE FROM login_failures WHERE failed_at <= ?",
                         (now - LOGIN_FAILURE_WINDOW_SECONDS,))
            conn.execute("INSERT INTO login_failures (email_key, failed_at) VALUES (?, ?)",
                         (email_key, now))
        raise error(400, "wrong_credentials", "The email or the password is wrong.")
    return user


def _login_retry_after(conn, email_key, now):
    """Seconds until this email may try again, or 0 when it is not throttled."""
    failures = conn.execute(
        "SELECT failed_at FROM login_failures WHERE email_key = ? AND failed_at > ?"
        " ORDER BY failed_at",
        (email_key, now - LOGIN_FAILURE_WINDOW_SECONDS),
    ).fetchall()
    if len(failures) < LOGIN_FAILURE_LIMIT:
        return 0
    return max(1, math.ceil(failures[-LOGIN_FAILURE_LIMIT][0] + LOGIN_FAILURE_WINDOW_SECONDS - now))


def _start_session(options, db, user, password):
    """Start a session for a user who just gave their password; its token."""
    # A hash of a lower cost than today's is replaced while the password is at hand.
    new_hash = None
    if _hash_iterations(user["password_hash"]) < options.password_iterations:
        new_hash = hash_password(password, options.password_iterations)
    token, now = secrets.token_urlsafe(TOKEN_BYTES), time.time()
    with db.transaction() as conn:
        conn.execute("DELETE FROM login_failures WHERE email_key = ?", (user["email_key"],))
        conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
        if new_hash:
            conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, user["id"]))
        conn.execute(
            "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES (?, ?, ?)",
            (_token_hash(token), user["id"], now + options.session_days * DAY_SECONDS),
        )
    return token


@route("DELETE", "/logout")
def logout(app, db, session):
    """End this session: the cookie is expired and its token no longer works."""
    with db.transaction() as conn:
        conn.execute("DELETE FROM sessions WHERE token_hash = ?", (session.token_hash,))
    _expire_session_cookie(app.options)
    return {}


@route("GET", "/users", returns=_ref("User"))
def current_user(caller):
    """The logged-in user."""
    return _json_text(caller)


@route("GET", "/users/<user>", path_params={"user": _text(1, description="An id (digits), or a search")},
       query={"limit": PAGE_LIMIT, "offset": OFFSET},
       returns={"oneOf": [_ref("User"), USER_LIST]},
       errors=("invalid_field", "user_not_found"))
def get_user(db, me, user):
    """A user by id (digits), or {"users": [...]} whose username or name matches the text."""
    if not user.isdecimal():
        return _search_users(db, me, user)
    user_id = _path_id(user)
    with db.connection() as conn:
        found = _users_json(conn, me, [user_id])
    if not found:
        raise _user_not_found()
    return _json_text(found[0])


def _search_users(db, me, query):
    limit, offset = _query_int("limit", PAGE_LIMIT), _query_int("offset", OFFSET)
    _search_text(query)
    with db.connection() as conn:
        rows = find_users(conn, _search_fold(query), limit, offset, db.search_index)
        users = _users_json(conn, me, [row["id"] for row in rows])
    return _user_list(users)


def find_users(conn, key, limit, offset, use_index=True):
    """Users whose username contains `key` (from _search_fold), or with a name word starting
    with it: the exact username, then usernames starting with it, then names, then the rest."""
    end = offset + limit
    # The exact and the prefix matches come in order from the search key's index.
    rows = conn.execute(
        "SELECT * FROM users WHERE search_key = ? ORDER BY username_key", (key,)
    ).fetchall()
    rows += conn.execute(
        "SELECT * FROM users WHERE search_key > ? AND search_key < ?"
        " ORDER BY search_key, username_key LIMIT ?",
        (key, key + "\U0010ffff", end),  # every string that starts with key sorts in between
    ).fetchall()
    # A name word can start with the key only if the key is one word.
    one_word = _search_words(key) == [key]
    if len(rows) < end and one_word:
        rows += _find_matches(
            conn, "users_names", '"' + key + '"*', "instr(' ' || u.name_key, ' ' || ?) > 0"
            " AND NOT (u.search_key >= ? AND u.search_key < ?)", (key, key, key + "\U0010ffff"),
            end - len(rows), use_index)
    if len(rows) < end:
        # A quoted FTS5 string: every character in it is literal.
        rows += _find_matches(
            conn, "users_search", '"' + key.replace('"', '""') + '"', "instr(u.search_key, ?) > 1"
            " AND NOT (? AND instr(' ' || u.name_key, ' ' || ?) > 0)", (key, one_word, key),
            end - len(rows), use_index and len(key) >= 3)
    return rows[offset:end]


def _find_matches(conn, index, phrase, condition, params, count, use_index):
    """The first `count` users (u), by search key, meeting an SQL condition that an FTS5
    `index` narrows down to those that match `phrase`."""
    if use_index:
        users = conn.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0]
        most = max(SORTED_SEARCH_MATCHES, users // SORTED_SEARCH_SHARE)
        matches = conn.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {index} WHERE {index} MATCH ? LIMIT ?)",
            (phrase, most + 1),
        ).fetchone()[0]
        if matches <= most:
            return conn.execute(
                f"SELECT u.* FROM {index} JOIN users AS u ON u.id = {index}.rowid"
                f" WHERE {index} MATCH ? AND {condition} ORDER BY u.search_key, u.username_key LIMIT ?",
                (phrase, *params, count),
            ).fetchall()
    # Many matches, or no index: walk the search key's index in order and
    # stop when the page is full. instr() takes % _ \ literally, unlike LIKE.
    return conn.execute(
        f"SELECT * FROM users AS u WHERE {condition} ORDER BY u.search_key, u.username_key LIMIT ?",
        (*params, count),
    ).fetchall()


# One path for both routes of /users/{user}, as OpenAPI wants; here it must be an id.
@route("PUT", "/users/<user>", path_params={"user": ID},
       body=_body(list(USER_FIELDS), id=ID, **PROFILE_FIELDS, password=_nullable(PASSWORD)),
       returns=_ref("User"),
       errors=("missing_field", "invalid_field", "email_taken", "username_taken", "user_not_found",
               "forbidden"))
def edit_user(app, db, session, user):
    """Replace the caller's profile: all of email, username, name, status, phone; password optional."""
    user_id = _path_id(user)
    _check_own_profile(db, session.user_id, user_id)
    fields, password = _profile(_json_body(), user_id)
    password_hash = hash_password(password, app.options.password_iterations) if password else None
    with db.transaction() as conn:
        _taken(conn, fields["email"], fields["username"], except_id=user_id)
        if _user_json(_load_user(conn, user_id)) != {"id": user_id, **fields}:
            conn.execute(
                "UPDATE users SET email = ?, email_key = ?, username = ?, username_key = ?,"
                " name = ?, name_key = ?, status = ?, phone = ? WHERE id = ?",
                (fields["email"], _fold(fields["email"]), fields["username"], _fold(fields["username"]),
                 fields["name"], _name_key(fields["name"]), fields["status"], fields["phone"], user_id),
            )
            _tell_contacts(conn, app.feed, user_id)
        if password_hash:
            _change_password(conn, session, password_hash)
        user = _user_json(_load_user(conn, user_id))
    app.feed.publish()
    return user


def _check_own_profile(db, me, user_id):
    """Raise forbidden for someone else's profile, user_not_found for no one's."""
    if user_id == me:
        return
    with db.connection() as conn:
        exists = _load_user(conn, user_id) is not None
    if exists:
        raise error(403, "forbidden", "You may only edit your own profile.")
    raise _user_not_found()


def _profile(body, user_id):
    """The whole profile of a PUT body, every field given: (fields, the new password or None)."""
    for field in USER_FIELDS:
        if field not in body:
            raise _missing(field)
    if "id" in body and (type(body["id"]) is not int or body["id"] != user_id):
        raise _invalid("id", "'id' must equal the id in the path.")
    fields = {field: _user_field(body, field, field in ("email", "username")) or ""
              for field in USER_FIELDS}
    return fields, _password(body, required=False)


def _tell_contacts(conn, feed, user_id):
    """A `user` update for a user whose profile or avatar changed, and for all who share a chat."""
    users = conn.execute(
        "SELECT DISTINCT others.user_id FROM chat_members AS mine JOIN chat_members AS others"
        " ON others.chat_id = mine.chat_id WHERE mine.user_id = ?", (user_id,)).fetchall()
    feed.to_users(conn, dict.fromkeys({user_id, *(row[0] for row in users)}, Event("user", user_id)))


def _change_password(conn, session, password_hash):
    """Store a new password hash and end every other session of its user."""
    conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, session.user_id))
    conn.execute("DELETE FROM sessions WHERE user_id = ? AND token_hash <> ?",
                 (session.user_id, session.token_hash))


# ---------------------------------------------------------------------------
# Avatars
# ---------------------------------------------------------------------------

IMAGE_SIGNATURES = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
]
PHOTO_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
    "Cache-Control": "no-cache",  # revalidate with the ETag: avatars change
}


def _image_type(data):
    """The MIME type of PNG, JPEG, GIF or WebP bytes, recognised by their start; else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in IMAGE_SIGNATURES if data.startswith(magic)), None)


def _uploaded_file():
    """The first file part of a multipart body, or None."""
    try:
        return next(iter(bottle.request.files.values()), None)
    except (bottle.HTTPError, ValueError, IndexError, KeyError):  # a malformed body
        return None


@route("POST", "/photos", upload=_body(["photo"], photo={"type": "string", "contentMediaType": "image/*"}),
       returns=_object(["url"], url=_text(1)), errors=("missing_field", "invalid_image", "payload_too_large"))
def upload_photo(app, db, me):
    """Upload the caller's avatar: multipart/form-data with one PNG, JPEG, GIF or WebP file."""
    limit = app.options.max_photo_bytes
    too_large = error(413, "payload_too_large", f"An avatar is limited to {limit} bytes.")
    if bottle.request.content_length > limit + MULTIPART_OVERHEAD:
        raise too_large
    upload = _uploaded_file()
    if upload is None:
        raise error(400, "missing_field", "Send the image as a file part of multipart/form-data.", "photo")
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise too_large
    content_type = _image_type(data)
    if content_type is None:
        raise error(400, "invalid_image", "The file is not a PNG, JPEG, GIF or WebP image.", "photo")
    etag = _etag(data)
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO photos (user_id, content_type, etag, data) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET content_type = excluded.content_type,"
            " etag = excluded.etag, data = excluded.data",
            (me, content_type, etag, data),
        )
        _tell_contacts(conn, app.feed, me)
    app.feed.publish()
    return {"url": f"/photos/{me}"}


@route("DELETE", "/photos")
def delete_photo(app, db, me):
    """Delete the caller's avatar; the generated default takes its place."""
    with db.transaction() as conn:
        if conn.execute("DELETE FROM photos WHERE user_id = ?", (me,)).rowcount:
            _tell_contacts(conn, app.feed, me)
    app.feed.publish()
    return {}


def _etag(data):
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _default_avatar(user):
    """An SVG avatar: the user's initials on a colour derived from the id."""
    words = user["name"].split()
    initials = "".join(word[0] for word in words[:2]) or user["username"][:1]
    hue = user["id"] * 137 % 360
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="128" height="128" viewBox="0 0 128 128">'
        f'<rect width="128" height="128" fill="hsl({hue}, 55%, 45%)"/>'
        '<text x="64" y="64" dy=".35em" text-anchor="middle" fill="#fff" '
        'font-family="sans-serif" font-size="52">'
        f"{html.escape(initials.upper())}</text></svg>"
    ).encode("utf-8")


def _etag_matches(etag):
    header = bottle.request.environ.get("HTTP_IF_NONE_MATCH", "")
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return etag in tags or "*" in tags


@route("GET", "/photos/<user_id>", headers={"If-None-Match": _text()}, returns=None,
       media={"image/*": {"type": "string", "contentMediaType": "image/*"}}, answers={"304": NOT_MODIFIED},
       errors=("user_not_found",))
def get_photo(db, me, user_id):
    """A user's avatar image: the upload, or a generated SVG; ETag and 304 supported."""
    user_id = _path_id(user_id)
    with db.connection() as conn:
        row = _load_user(conn, user_id)
        photo = conn.execute("SELECT * FROM photos WHERE user_id = ?", (user_id,)).fetchone()
    if row is None:
        raise _user_not_found()
    if photo:
        data, content_type, etag = photo["data"], photo["content_type"], photo["etag"]
    else:
        data, content_type = _default_avatar(row), "image/svg+xml"
        etag = _etag(data)
    headers = dict(PHOTO_HEADERS, ETag=etag)
    if _etag_matches(etag):
        return bottle.HTTPResponse(status=304, headers=headers)
    return bottle.HTTPResponse(data, 200, headers, content_type=content_type)


# ---------------------------------------------------------------------------
# Chats
# ---------------------------------------------------------------------------

# SQLite writes the JSON of chats itself: in C, and with no Python dict per
# row, that is a third of what building them in Python costs. A message's
# JSON is stored in its row (schema.sql): Python never builds one, and the
# last message is joined to its chat's as text (json() would parse it
# again): the object's closing brace comes off and goes back after it (the
# object ends with a time stamp, so the brace is its only trailing one).
CHAT_QUERY = """
    SELECT rtrim(json_object(
               'id', c.id,
               'type', c.type,
               'name', CASE c.type WHEN 'group' THEN c.name
                                   ELSE coalesce(nullif(other.name, ''), other.username) END,
               'members', CASE c.type WHEN 'group'
                              THEN (SELECT json_group_array(user_id) FROM (SELECT user_id
                                      FROM chat_members WHERE chat_id = c.id ORDER BY user_id))
                              ELSE json_array(c.user_low, c.user_high) END,
               'owner_id', c.owner_id,
               'unread_count', c.message_count - m.seen_count,
               'last_read_id', m.last_read_id,
               'others_read_id', CASE c.type WHEN 'group'
                                     THEN (SELECT coalesce(max(last_read_id), 0) FROM chat_members
                                            WHERE chat_id = c.id AND user_id <> m.user_id)
                                     ELSE coalesce(theirs.last_read_id, 0) END,
               'created_at', c.created_at), '}')
           || ',"last_message":' || coalesce(message.json, 'null') || '}' AS chat
      FROM chat_members AS m
      JOIN chats AS c ON c.id = m.chat_id
      LEFT JOIN users AS other ON other.id = CASE WHEN c.user_low = m.user_id
                                                  THEN c.user_high ELSE c.user_low END
      LEFT JOIN chat_members AS theirs ON theirs.chat_id = c.id AND theirs.user_id = other.id
      LEFT JOIN messages AS message ON message.id = c.last_message_id
"""


# A new chat's opened_after (schema.sql): after the newest message id handed out.
OPENED_NOW = "(SELECT coalesce(max(seq), 0) + 0.5 FROM sqlite_sequence WHERE name = 'messages')"


def _exists(conn, sql, params):
    """Whether a query finds a row."""
    return conn.execute(sql, params).fetchone() is not None


def _json_text(text):
    """Answer JSON text that is already written (by SQLite), as is."""
    bottle.response.content_type = JSON_TYPE
    return text


def _chat_text(conn, me, chat_id):
    """The chat's JSON as `me` sees it, or raise chat_not_found (also when `me` is not in it)."""
    row = conn.execute(CHAT_QUERY + " WHERE m.user_id = ? AND m.chat_id = ?", (me, chat_id)).fetchone()
    if row is None:
        raise _chat_not_found()
    return row[0]


def _chat_row(conn, me, chat_id):
    """A chat `me` is a member of, or raise chat_not_found (also when `me` is not in it)."""
    row = conn.execute(
        "SELECT c.* FROM chats AS c JOIN chat_members AS m ON m.chat_id = c.id"
        " WHERE c.id = ? AND m.user_id = ?",
        (chat_id, me),
    ).fetchone()
    if row is None:
        raise _chat_not_found()
    return row


def _group_row(conn, me, chat_id):
    """A group `me` is a member of; chat_not_found, or forbidden for a dialog."""
    chat = _chat_row(conn, me, chat_id)
    if chat["type"] != "group":
        raise error(403, "forbidden", "A dialog has no name or members of its own to change.")
    return chat


def _member_ids(conn, chat_id):
    return [row[0] for row in conn.execute(
        "SELECT user_id FROM chat_members WHERE chat_id = ? ORDER BY user_id", (chat_id,))]


def _other_members(body, me):
    """A new group's other members, from member_ids: ascending, without duplicates or the caller."""
    value = body.get("member_ids")
    if value is None:
        return []
    if not isinstance(value, list) or any(type(v) is not int or not 1 <= v <= MAX_ID for v in value):
        raise _invalid("member_ids", "'member_ids' must be a list of user ids.")
    others = sorted(set(value) - {me})
    if len(others) >= MAX_GROUP_MEMBERS:
        raise _invalid("member_ids", f"A group has at most {MAX_GROUP_MEMBERS} members, the creator too.")
    return others


@route("POST", "/chats", body={"oneOf": [
    _body(["user_id"], user_id=ID),
    _body(["name"], name=NAME,
          member_ids=_nullable({"type": "array", "items": ID, "maxItems": MAX_GROUP_MEMBERS - 1}))]},
       returns=_ref("Chat"), errors=("missing_field", "invalid_field", "user_not_found"))
def create_chat(app, db, me):
    """Open the dialog with a user ({"user_id"}), or create a group ({"name", "member_ids"})."""
    body = _json_body()
    if body.get("name") is None:
        return _open_dialog(app, db, me, _json_int(body, "user_id"))
    if body.get("user_id") is not None:
        raise _invalid("user_id", "Give 'user_id' for a dialog or 'name' for a group, not both.")
    name = _visible_text(body, "name", MAX_CHAT_NAME_CHARS)
    return _create_group(app, db, me, name, _other_members(body, me))


def _open_dialog(app, db, me, other):
    """The dialog of `me` and `other`, opened now or earlier."""
    if other == me:
        raise _invalid("user_id", "A dialog needs another user than yourself.")
    low, high = sorted((me, other))
    with db.transaction() as conn:
        if _load_user(conn, other) is None:
            raise _user_not_found("user_id")
        created = conn.execute(
            "INSERT INTO chats (type, user_low, user_high, created_at, opened_after)"
            " VALUES ('dialog', ?, ?, ?, " + OPENED_NOW + ")"
            " ON CONFLICT (user_low, user_high) DO NOTHING",
            (low, high, _iso(time.time())),
        ).rowcount
        chat_id = conn.execute(
            "SELECT id FROM chats WHERE user_low = ? AND user_high = ?", (low, high)
        ).fetchone()["id"]
        if created:
            conn.executemany(
                "INSERT INTO chat_members (chat_id, user_id) VALUES (?, ?)",
                [(chat_id, low), (chat_id, high)],
            )
            _open_spans(conn, chat_id, (low, high))
            app.feed.to_chat(conn, chat_id, Event("chat", chat_id))
        chat = _chat_text(conn, me, chat_id)
    app.feed.publish()
    return _json_text(chat)


def _create_group(app, db, me, name, others):
    """A new group of `me`, its owner, and `others`."""
    with db.transaction() as conn:
        for user in others:
            if _load_user(conn, user) is None:
                raise _user_not_found("member_ids")
        chat_id = conn.execute(
            "INSERT INTO chats (type, name, owner_id, created_at, opened_after)"
            " VALUES ('group', ?, ?, ?, " + OPENED_NOW + ")",
            (name, me, _iso(time.time())),
        ).lastrowid
        members = [me, *others]
        conn.executemany(
            "INSERT INTO chat_members (chat_id, user_id, joined) VALUES (?, ?, ?)",
            [(chat_id, user, joined) for joined, user in enumerate(members)],
        )
        _open_spans(conn, chat_id, members)
        app.feed.to_chat(conn, chat_id, Event("chat", chat_id))
        chat = _chat_text(conn, me, chat_id)
    app.feed.publish()
    return _json_text(chat)


@route("GET", "/chats", returns=_object(["chats", "next_offset"], next_offset=OFFSET,
                                        chats={"type": "array", "items": _ref("Chat")}))
def list_chats(db, me):
    """The caller's chats, most recent activity first, and the updates offset that follows them."""
    with db.connection() as conn:
        # One statement, one snapshot: the offset is of the same moment as the chats.
        chats, next_offset = conn.execute(
            "SELECT group_concat(chat, ','), (SELECT coalesce(max(id), 0) + 1 FROM updates) FROM ("
            + CHAT_QUERY + " WHERE m.user_id = ?"
            " ORDER BY coalesce(c.last_message_id, c.opened_after) DESC, c.id DESC)",
            (me,),
        ).fetchone()
    return _json_text('{"chats":[' + (chats or "") + f'],"next_offset":{next_offset}}}')


@route("GET", "/chats/<chat_id>", returns=_ref("Chat"), errors=("chat_not_found",))
def get_chat(db, me, chat_id):
    """One of the caller's chats."""
    chat_id = _path_id(chat_id)
    with db.connection() as conn:
        return _json_text(_chat_text(conn, me, chat_id))


@route("GET", "/chats/<chat_id>/members", returns=USER_LIST, errors=("chat_not_found",))
def list_members(db, me, chat_id):
    """The members of one of the caller's chats, as users, by ascending id."""
    chat_id = _path_id(chat_id)
    with db.connection() as conn:
        _chat_row(conn, me, chat_id)
        users = _users_json(conn, me, _member_ids(conn, chat_id))
    return _user_list(users)


@route("PUT", "/chats/<chat_id>", body=_body(["name"], name=NAME), returns=_ref("Chat"),
       errors=("missing_field", "invalid_field", "chat_not_found", "forbidden"))
def rename_chat(app, db, me, chat_id):
    """Rename a group; any member may."""
    chat_id = _path_id(chat_id)
    name = _visible_text(_json_body(), "name", MAX_CHAT_NAME_CHARS)
    with db.transaction() as conn:
        chat = _group_row(conn, me, chat_id)
        if name != chat["name"]:
            conn.execute("UPDATE chats SET name = ? WHERE id = ?", (name, chat_id))
            app.feed.to_chat(conn, chat_id, Event("chat", chat_id))
        renamed = _chat_text(conn, me, chat_id)
    app.feed.publish()
    return _json_text(renamed)


@route("POST", "/chats/<chat_id>/members", body=USER_ID_BODY, returns=_ref("Chat"),
       errors=("missing_field", "invalid_field", "user_not_found", "chat_not_found", "forbidden"))
def add_member(app, db, me, chat_id):
    """Add a user to a group; any member may, and adding a member again changes nothing."""
    chat_id = _path_id(chat_id)
    user_id = _json_int(_json_body(), "user_id")
    with db.transaction() as conn:
        _group_row(conn, me, chat_id)
        if _load_user(conn, user_id) is None:
            raise _user_not_found("user_id")
        members = _member_ids(conn, chat_id)
        if user_id not in members:
            if len(members) >= MAX_GROUP_MEMBERS:
                raise _invalid("user_id", f"The group already has {MAX_GROUP_MEMBERS} members.")
            # A new member has read everything there is: nothing is unread.
            # A former member's messages stay in the group, and count again.
            conn.execute(
                "INSERT INTO chat_members (chat_id, user_id, joined, last_read_id, seen_count, posted)"
                " SELECT ?, ?, (SELECT max(joined) + 1 FROM chat_members WHERE chat_id = ?),"
                " coalesce(last_message_id, 0), message_count,"
                " (SELECT count(*) FROM messages WHERE chat_id = ? AND author_id = ?)"
                " FROM chats WHERE id = ?",
                (chat_id, user_id, chat_id, chat_id, user_id, chat_id),
            )
            _open_spans(conn, chat_id, [user_id])
            app.feed.to_chat(conn, chat_id, Event("chat", chat_id))
        chat = _chat_text(conn, me, chat_id)
    app.feed.publish()
    return _json_text(chat)


@route("DELETE", "/chats/<chat_id>/members/<user_id>", returns={"oneOf": [EMPTY, _ref("Chat")]},
       errors=("user_not_found", "chat_not_found", "forbidden"))
def remove_member(app, db, me, chat_id, user_id):
    """Leave a group ({}), or as its owner remove a member (the group); a non-member: no change."""
    chat_id, user_id = _path_id(chat_id), _path_id(user_id, "user_id")
    with db.transaction() as conn:
        chat = _group_row(conn, me, chat_id)
        if _load_user(conn, user_id) is None:
            raise _user_not_found()
        members = _member_ids(conn, chat_id)
        if user_id in members:  # removing someone who is not a member changes nothing
            if user_id != me and chat["owner_id"] != me:
                raise error(403, "forbidden", "Only the group's owner may remove other members.")
            _leave_group(conn, app.feed, chat, user_id, members)
        group = None if user_id == me else _chat_text(conn, me, chat_id)
    app.feed.publish()
    return {} if group is None else _json_text(group)


def _leave_group(conn, feed, chat, user_id, members):
    """Take a member out of a group; the last one out deletes it."""
    # An owner who leaves hands the group to the member who joined earliest.
    chat_id = chat["id"]
    conn.execute("DELETE FROM chat_members WHERE chat_id = ? AND user_id = ?", (chat_id, user_id))
    _close_span(conn, chat_id, user_id)
    feed.to_users(conn, {user_id: Event("chat_removed", payload={"chat_id": chat_id})})
    if len(members) > 1:
        if chat["owner_id"] == user_id:
            conn.execute(
                "UPDATE chats SET owner_id = (SELECT user_id FROM chat_members WHERE chat_id = ?"
                " ORDER BY joined, user_id LIMIT 1) WHERE id = ?",
                (chat_id, chat_id),
            )
        feed.to_chat(conn, chat_id, Event("chat", chat_id))
    else:
        conn.execute("DELETE FROM messages_search WHERE rowid IN"
                     " (SELECT id FROM messages WHERE chat_id = ?)", (chat_id,))
        conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))  # its messages and spans go with it


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


def _message_json(conn, message_id):
    """A message's JSON, as every route shows it."""
    return conn.execute("SELECT json FROM messages WHERE id = ?", (message_id,)).fetchone()[0]


def _chat_message(conn, me, chat_id, message_id):
    """A chat of `me` and a message of it, or raise chat_not_found or message_not_found."""
    chat = _chat_row(conn, me, chat_id)
    message = conn.execute(
        "SELECT * FROM messages WHERE id = ? AND chat_id = ?", (message_id, chat_id)
    ).fetchone()
    if message is None:
        raise error(400, "message_not_found", "There is no message with this id in this chat.")
    return chat, message


def _change_text(conn, message_id, text, edited_at):
    """Store a message's new text, and the words a search finds it by if it is indexed yet."""
    conn.execute("UPDATE messages SET text = ?, edited_at = ? WHERE id = ?", (text, edited_at, message_id))
    chat_id, files = conn.execute("SELECT chat_id, files FROM messages WHERE id = ?",
                                  (message_id,)).fetchone()
    conn.execute("UPDATE messages_search SET words = ? WHERE rowid = ?",
                 (_indexed_words(chat_id, _searched_text(text, files)), message_id))


def _insert_message(conn, chat_id, author_id, text, created_at, files=(), reply_to_id=None, client_id=None):
    """Store a message carrying `files` (rows of id and JSON; a search indexes it later): its id and JSON."""
    message_id, message = conn.execute(
        "INSERT INTO messages (chat_id, author_id, text, files, reply_to_id, client_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id, json",
        (chat_id, author_id, text, "[" + ",".join(row["json"] for row in files) + "]", reply_to_id,
         client_id, created_at),
    ).fetchone()
    if files:
        conn.executemany("INSERT INTO message_files (file_id, message_id) VALUES (?, ?)",
                         [(row["id"], message_id) for row in files])
    return message_id, message


def _message_text(body, has_files):
    """A message's text: visible text, or with files also none at all ("")."""
    if has_files and body.get("text") in (None, ""):
        return ""
    return _visible_text(body, "text", MAX_MESSAGE_CHARS, allowed="\n\r\t")


def _file_ids(body):
    """The file_ids of a send: 0 to MAX_MESSAGE_FILES distinct ids (absent or null: none)."""
    value = body.get("file_ids")
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_MESSAGE_FILES:
        raise _invalid("file_ids", f"'file_ids' must be a list of at most {MAX_MESSAGE_FILES} file ids.")
    if len(set(value)) < len(value) or any(type(item) is not int or not 1 <= item <= MAX_ID
                                           for item in value):
        raise _invalid("file_ids", "'file_ids' must hold distinct positive integers.")
    return value


def _client_id(body):
    """A send's client_id: 1 to 64 printable ASCII characters, no space; None when absent or null."""
    value = body.get("client_id")
    if value is not None and not (isinstance(value, str) and len(value) <= MAX_CLIENT_ID_CHARS
                                  and re.fullmatch(CLIENT_ID_PATTERN, value)):
        raise _invalid("client_id", f"'client_id' must be 1 to {MAX_CLIENT_ID_CHARS} printable ASCII"
                                    " characters without spaces.")
    return value


def _first_send(conn, chat_id, me, client_id, now):
    """The message a send with this client_id made in the last day, as JSON text; None if there was
    none; message_not_found if it was deleted."""
    sent = conn.execute(
        "SELECT message_id FROM sends WHERE chat_id = ? AND author_id = ? AND client_id = ? AND sent_at >= ?",
        (chat_id, me, client_id, now - RETRY_SECONDS),
    ).fetchone()
    if sent is None:
        return None
    message = conn.execute("SELECT json FROM messages WHERE id = ?", (sent[0],)).fetchone()
    if message is None:
        raise error(400, "message_not_found", "The message this client_id sent has been deleted.",
                    "client_id")
    return message[0]


@route("POST", "/chats/<chat_id>/messages", body=SEND_BODY, returns=_ref("Message"),
       errors=("missing_field", "invalid_field", "chat_not_found", "file_not_found", "message_not_found"))
def send_message(app, db, me, chat_id):
    """Send a message (text, files or both; maybe a reply) to one of the caller's chats; a retry with
    the same client_id answers the first send's message."""
    chat_id = _path_id(chat_id)
    body = _json_body()
    file_ids = _file_ids(body)
    text = _message_text(body, has_files=bool(file_ids))
    reply_to_id = _json_int(body, "reply_to_id", required=False)
    client_id = _client_id(body)
    now = time.time()
    with db.transaction() as conn:
        chat = _chat_row(conn, me, chat_id)
        # Inside the write transaction: of two sends of one client_id at the
        # same moment, the second waits for the first and finds its message.
        sent = client_id and _first_send(conn, chat_id, me, client_id, now)
        if sent:
            return _json_text(sent)
        files = _own_files(conn, me, file_ids, now)
        if reply_to_id is not None and not _exists(
                conn, "SELECT 1 FROM messages WHERE id = ? AND chat_id = ?", (reply_to_id, chat_id)):
            raise error(400, "message_not_found", "'reply_to_id' is not a message of this chat.",
                        "reply_to_id")
        message_id, message = _insert_message(conn, chat_id, me, text, _iso(now), files, reply_to_id,
                                              client_id)
        if client_id:
            conn.execute("INSERT OR REPLACE INTO sends (chat_id, author_id, client_id, message_id, sent_at)"
                         " VALUES (?, ?, ?, ?, ?)", (chat_id, me, client_id, message_id, now))
        # One more message, which every other member has not seen yet; the
        # author has read up to here and seen them all, and written once more.
        conn.execute("UPDATE chats SET last_message_id = ?, message_count = message_count + 1 WHERE id = ?",
                     (message_id, chat_id))
        conn.execute(
            "UPDATE chat_members SET last_read_id = ?, posted = posted + 1, seen_count = ?"
            " WHERE chat_id = ? AND user_id = ?",
            (message_id, chat["message_count"] + 1, chat_id, me),
        )
        app.feed.to_chat(conn, chat_id, Event("message", message_id))
    app.feed.typing_ended(chat_id, me)
    app.feed.publish()
    return _json_text(message)


@route("GET", "/chats/<chat_id>/messages/<message_id>", returns=_ref("Message"),
       errors=("chat_not_found", "message_not_found"))
def get_message(db, me, chat_id, message_id):
    """One message of a chat (the one a reply quotes, say)."""
    chat_id, message_id = _path_id(chat_id), _path_id(message_id, "message_id")
    with db.connection() as conn:
        _, message = _chat_message(conn, me, chat_id, message_id)
    return _json_text(message["json"])


@route("GET", "/chats/<chat_id>/messages", returns=MESSAGE_PAGE, errors=("chat_not_found",),
       query={"limit": PAGE_LIMIT, "before": ID, "after": AFTER})
def list_messages(db, me, chat_id):
    """A page of a chat's messages, oldest first: the newest, or ?before= / ?after= a message id."""
    chat_id = _path_id(chat_id)
    limit = _query_int("limit", PAGE_LIMIT)
    before, after = _query_int("before", ID), _query_int("after", AFTER)
    if before is not None and after is not None:
        raise _invalid("before", "Give at most one of 'before' and 'after'.")
    with db.connection() as conn:
        _chat_row(conn, me, chat_id)
        messages, has_more = _message_page(conn, chat_id, limit, before, after)
    return _json_text(f'{{"messages":[{messages}],"has_more":{"true" if has_more else "false"}}}')


def _message_page(conn, chat_id, limit, before, after):
    """A page of a chat's messages as JSON text, oldest first, and whether more lie beyond it."""
    # One statement in the index's order, a row more than the page: whether
    # that row exists says whether there are more.
    if after is not None:
        rows = _first_column(conn, "SELECT json FROM messages WHERE chat_id = ? AND id > ?"
                                   " ORDER BY id LIMIT ?", (chat_id, after, limit + 1))
        page = rows[:limit]
    else:
        rows = _first_column(conn, "SELECT json FROM messages WHERE chat_id = ? AND id < ?"
                                   " ORDER BY id DESC LIMIT ?",
                             (chat_id, MAX_ID if before is None else before, limit + 1))
        page = rows[:limit][::-1]
    return ",".join(page), len(rows) > limit


def _first_column(conn, sql, params):
    """The first column of every row a query finds (read as plain tuples: a page is many rows)."""
    cursor = conn.cursor()
    cursor.row_factory = None
    return [row[0] for row in cursor.execute(sql, params)]


@route("PUT", "/chats/<chat_id>/messages/<message_id>", body=EDIT_BODY, returns=_ref("Message"),
       errors=("missing_field", "invalid_field", "chat_not_found", "message_not_found", "forbidden"))
def edit_message(app, db, me, chat_id, message_id):
    """Change the text of one of your messages (edited_at is set); the same text changes nothing."""
    chat_id, message_id = _path_id(chat_id), _path_id(message_id, "message_id")
    body = _json_body()
    # "" only for a message with files, which is known below; an edit without text is a mistake.
    text = "" if body.get("text") == "" else _message_text(body, has_files=False)
    with db.transaction() as conn:
        _, message = _chat_message(conn, me, chat_id, message_id)
        if message["author_id"] != me:
            raise error(403, "forbidden", "Only its author may edit a message.")
        if not text and message["files"] == "[]":
            raise _invalid("text", f"'text' must be 1 to {MAX_MESSAGE_CHARS} characters long.")
        if text != message["text"]:
            _change_text(conn, message_id, text, _iso(time.time()))
            app.feed.to_chat(conn, chat_id, Event("message_edited", message_id))
        message = _message_json(conn, message_id)
    app.feed.publish()
    return _json_text(message)


@route("DELETE", "/chats/<chat_id>/messages/<message_id>",
       errors=("chat_not_found", "message_not_found", "forbidden"))
def delete_message(app, db, me, chat_id, message_id):
    """Delete a message: your own, or any in a group you own. Its id is never used again."""
    chat_id, message_id = _path_id(chat_id), _path_id(message_id, "message_id")
    with db.transaction() as conn:
        chat, message = _chat_message(conn, me, chat_id, message_id)
        author_id = message["author_id"]
        if author_id != me and not (chat["type"] == "group" and chat["owner_id"] == me):
            raise error(403, "forbidden", "Only its author, or the owner of a group, may delete a message.")
        # One message fewer; whoever had seen it (read it, or wrote it) has seen one fewer.
        conn.execute("UPDATE chats SET message_count = message_count - 1 WHERE id = ?", (chat_id,))
        conn.execute(
            "UPDATE chat_members SET seen_count = seen_count - 1, posted = posted - (user_id = ?)"
            " WHERE chat_id = ? AND (user_id = ? OR last_read_id >= ?)",
            (author_id, chat_id, author_id, message_id),
        )
        file_ids = [row[0] for row in conn.execute("SELECT file_id FROM message_files WHERE message_id = ?",
                                                   (message_id,))]
        conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        conn.execute("DELETE FROM messages_search WHERE rowid = ?", (message_id,))
        _delete_unsent_files(conn, time.time(), file_ids)
        conn.execute("UPDATE chats SET last_message_id = (SELECT max(id) FROM messages WHERE chat_id = ?)"
                     " WHERE id = ?", (chat_id, chat_id))
        event = Event("message_deleted", payload={"chat_id": chat_id, "message_id": message_id})
        app.feed.to_chat(conn, chat_id, event)
    app.feed.publish()
    return {}


def _emoji(body):
    """A reaction: NFC, so that a composed and a decomposed é are one reaction."""
    emoji = unicodedata.normalize("NFC", _string(body, "emoji", required=True))
    if not 1 <= len(emoji) <= MAX_EMOJI_CHARS:
        raise _invalid("emoji", f"'emoji' must be 1 to {MAX_EMOJI_CHARS} characters long.")
    if _has_control(emoji) or any(c.isspace() for c in emoji):
        raise _invalid("emoji", "'emoji' must not contain white space or control characters.")
    if not _has_visible(emoji):
        raise _invalid("emoji", "'emoji' must have a visible character.")
    return emoji


@route("PUT", "/chats/<chat_id>/messages/<message_id>/reaction", returns=_ref("Message"),
       body=_body(["emoji"], emoji=_text(1, MAX_EMOJI_CHARS,
                                         description="No white space or control characters.")),
       errors=("missing_field", "invalid_field", "chat_not_found", "message_not_found"))
def add_reaction(app, db, me, chat_id, message_id):
    """React to a message with an emoji; one reaction per user, so a new one replaces yours."""
    emoji = _emoji(_json_body())
    return _set_reaction(app, db, me, chat_id, message_id, emoji)


@route("DELETE", "/chats/<chat_id>/messages/<message_id>/reaction", returns=_ref("Message"),
       errors=("chat_not_found", "message_not_found"))
def remove_reaction(app, db, me, chat_id, message_id):
    """Take your reaction off a message (none to take off changes nothing)."""
    return _set_reaction(app, db, me, chat_id, message_id, None)


def _write_reactions(conn, message_id):
    """Write a message's reactions into its JSON: {"emoji": [user ids, ascending], ...}."""
    conn.execute(
        "UPDATE messages SET reactions = (SELECT json_group_object(emoji, json(users)) FROM"
        " (SELECT emoji, json_group_array(user_id) AS users FROM (SELECT emoji, user_id"
        " FROM reactions WHERE message_id = ? ORDER BY emoji, user_id) GROUP BY emoji))"
        " WHERE id = ?",
        (message_id, message_id),
    )


def _set_reaction(app, db, me, chat_id, message_id, emoji):
    """Make the caller's reaction `emoji` (None: none); the message."""
    chat_id, message_id = _path_id(chat_id), _path_id(message_id, "message_id")
    with db.transaction() as conn:
        _chat_message(conn, me, chat_id, message_id)
        old = conn.execute("SELECT emoji FROM reactions WHERE message_id = ? AND user_id = ?",
                           (message_id, me)).fetchone()
        if emoji != (old and old["emoji"]):
            if emoji is None:
                conn.execute("DELETE FROM reactions WHERE message_id = ? AND user_id = ?", (message_id, me))
            else:
                conn.execute(
                    "INSERT INTO reactions (message_id, user_id, emoji) VALUES (?, ?, ?)"
                    " ON CONFLICT (message_id, user_id) DO UPDATE SET emoji = excluded.emoji",
                    (message_id, me, emoji),
                )
            _write_reactions(conn, message_id)
            event = Event("reaction", payload={"chat_id": chat_id, "message_id": message_id, "user_id": me,
                                               "emoji": emoji})
            app.feed.to_chat(conn, chat_id, event)
        message = _message_json(conn, message_id)
    app.feed.publish()
    return _json_text(message)


@route("POST", "/chats/<chat_id>/read", body=_body([], message_id=_nullable(ID)),
       returns=_object(["unread_count"], unread_count={"type": "integer", "minimum": 0}),
       errors=("invalid_field", "chat_not_found"))
def mark_read(app, db, me, chat_id):
    """Move the caller's read mark forward, to a message or to the newest; the unread count."""
    chat_id = _path_id(chat_id)
    message_id = _json_int(_json_body(), "message_id", required=False)
    with db.transaction() as conn:
        chat = _chat_row(conn, me, chat_id)
        if message_id is None:
            message_id = chat["last_message_id"] or 0
        elif not _exists(conn, "SELECT 1 FROM messages WHERE id = ? AND chat_id = ?", (message_id, chat_id)):
            raise _invalid("message_id", "'message_id' is not a message of this chat.")
        # Seen: all but the others' messages after the mark (counting those is
        # as cheap as what is unread; counting what was read would grow without end).
        moved = conn.execute(
            "UPDATE chat_members SET last_read_id = ?,"
            " seen_count = (SELECT message_count FROM chats WHERE id = ?)"
            " - (SELECT count(*) FROM messages WHERE chat_id = ? AND id > ? AND author_id <> ?)"
            " WHERE user_id = ? AND chat_id = ? AND last_read_id < ?",
            (message_id, chat_id, chat_id, message_id, me, me, chat_id, message_id),
        ).rowcount
        if moved:
            # The reader's other devices, and in a dialog the other member; never
            # a whole group, so a read costs the same in a group as in a dialog.
            readers = {me, chat["user_low"], chat["user_high"]} - {None}
            event = Event("read", payload={"chat_id": chat_id, "user_id": me, "message_id": message_id})
            app.feed.to_users(conn, dict.fromkeys(readers, event))
        unread_count = conn.execute(
            "SELECT c.message_count - m.seen_count FROM chat_members AS m JOIN chats AS c ON c.id = m.chat_id"
            " WHERE m.user_id = ? AND m.chat_id = ?", (me, chat_id)
        ).fetchone()[0]
    if moved:
        app.feed.publish()
    return {"unread_count": unread_count}


def _searched_text(text, files):
    """What a search reads of a message: its text and the names of its files (their JSON)."""
    return " ".join([text] + [file["name"] for file in json.loads(files)])


def _indexed_words(chat_id, text):
    """A message's words as the search index keeps them, each after its chat's id and "x"."""
    return " ".join(f"{chat_id}x{word}" for word in _search_words(text))


def _starts_words(indexed, query):
    """Whether every word of `query` (by spaces) starts one of the words of `indexed` (a search
    without FTS5)."""
    words = [word.partition("x")[2] for word in indexed.split(" ")]
    return all(any(word.startswith(part) for word in words) for part in query.split(" "))


@route("GET", "/messages", returns=MESSAGE_PAGE, errors=("missing_field", "invalid_field", "chat_not_found"),
       query={"query": _text(1, MAX_SEARCH_CHARS), "chat_id": ID, "limit": PAGE_LIMIT, "before": ID})
def search_messages(db, me):
    """Messages in the caller's chats whose words start with every word of ?query=, newest first."""
    if "query" not in bottle.request.query:
        raise _missing("query")
    query = bottle.request.query.getunicode("query") or ""  # "" when it is not UTF-8
    if not query:
        raise _invalid("query", f"'query' must be text of 1 to {MAX_SEARCH_CHARS} characters.")
    words = _search_words(_search_text(query))
    chat_id, limit = _query_int("chat_id", ID), _query_int("limit", PAGE_LIMIT)
    before = _query_int("before", ID)
    if not words:
        raise _invalid("query", "A search needs a word: a letter or a digit.")
    with db.connection() as conn:
        if chat_id is not None:
            _chat_row(conn, me, chat_id)
    index_messages(db, me, chat_id)
    with db.connection() as conn:
        rows = find_messages(conn, me, words, chat_id, before or MAX_ID, limit + 1, db.search_index)
    messages = ",".join(row[0] for row in rows[:limit])
    return _json_text(f'{{"messages":[{messages}],"has_more":{"true" if len(rows) > limit else "false"}}}')


def _searched_chats(conn, me, chat_id):
    """The chats a search of `me` reads: that one, or all of theirs."""
    if chat_id is not None:
        return [chat_id]
    return [row[0] for row in conn.execute("SELECT chat_id FROM chat_members WHERE user_id = ?", (me,))]


def index_messages(db, me, chat_id=None):
    """Index the words of the messages that the chats a search reads received since the last one."""
    # Only the searcher's chats: what a search costs must not tell them how
    # much is written in chats they are not in.
    with db.connection() as conn:
        chats = conn.execute(
            "SELECT c.id FROM chats AS c WHERE c.id IN (SELECT value FROM json_each(?)) AND EXISTS"
            " (SELECT 1 FROM messages WHERE chat_id = c.id AND id > c.indexed_up_to)",
            (_to_json(_searched_chats(conn, me, chat_id)),)
        ).fetchall()
    for (chat,) in chats:
        # A batch at a time, so that no transaction holds the write lock long
        # (after an upgrade a chat may have a million messages to index).
        while True:
            with db.transaction() as conn:
                rows = conn.execute(
                    "SELECT m.id, m.text, m.files FROM messages AS m JOIN chats AS c ON c.id = m.chat_id"
                    " WHERE m.chat_id = ? AND m.id > c.indexed_up_to ORDER BY m.id LIMIT ?",
                    (chat, SEARCH_BATCH),
                ).fetchall()
                if not rows:
                    break
                conn.executemany(
                    "INSERT INTO messages_search (rowid, words, chat_id) VALUES (?, ?, ?)",
                    [(row["id"], _indexed_words(chat, _searched_text(row["text"], row["files"])), chat)
                     for row in rows])
                conn.execute("UPDATE chats SET indexed_up_to = ? WHERE id = ?", (rows[-1]["id"], chat))
            if len(rows) < SEARCH_BATCH:
                break


def find_messages(conn, me, words, chat_id, before, limit, use_index=True):
    """Rows of the JSON of the newest messages in the chats of `me` whose words start with `words`."""
    chats = _searched_chats(conn, me, chat_id)
    if not words or not chats:
        return []
    if use_index:
        # Each chat's words are apart in the index ("12xпривет"), so this
        # reads only the words of the searcher's chats; quoted, each is
        # taken literally, and the * makes it a prefix.
        match = " OR ".join("(" + " AND ".join(f'"{chat}x{word}"*' for word in words) + ")"
                            for chat in chats)
        return conn.execute(
            "SELECT m.json FROM messages_search AS s JOIN messages AS m ON m.id = s.rowid"
            " WHERE messages_search MATCH ? AND s.rowid < ?"  # rowid: FTS5 seeks
            " ORDER BY s.rowid DESC LIMIT ?",
            (match, before, limit),
        ).fetchall()
    return conn.execute(
        "SELECT m.json FROM messages_search AS s JOIN messages AS m ON m.id = s.rowid"
        " WHERE s.chat_id IN (SELECT value FROM json_each(?)) AND s.rowid < ? AND starts_words(s.words, ?)"
        " ORDER BY s.rowid DESC LIMIT ?",
        (_to_json(chats), before, " ".join(words), limit),
    ).fetchall()


@route("POST", "/chats/<chat_id>/typing", errors=("invalid_field", "chat_not_found"),
       body=_body([], typing=_nullable({"type": "boolean", "default": True})))
def set_typing(app, db, me, chat_id):
    """Tell the chat's other members that the caller is typing ({"typing": false}: stopped)."""
    chat_id = _path_id(chat_id)
    typing = _json_body().get("typing", True)
    if typing is None:
        typing = True
    if not isinstance(typing, bool):
        raise _invalid("typing", "'typing' must be true or false.")
    with db.connection() as conn:
        _chat_row(conn, me, chat_id)
    if app.feed.typing_is_news(chat_id, me, typing):
        with db.transaction() as conn:
            event = Event("typing", me, {"chat_id": chat_id, "user_id": me, "typing": typing})
            app.feed.to_chat(conn, chat_id, event)
        app.feed.publish()
    return {}


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

# Served as they are: types a browser shows or plays and never runs. Any
# other (HTML, SVG, XML, script...) is served as bytes to download, so that
# no user can put a page on the API's origin.
SHOWN_TYPES = re.compile(r"(image|audio|video)/(?!.*(svg|xml|html|javascript|ecmascript))[^/]+"
                         r"|text/plain|application/pdf")
MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")  # a well-formed type/subtype
FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": PHOTO_HEADERS["Content-Security-Policy"],
    "Cache-Control": "private",  # a file's bytes never change, and only some may read them
    "Accept-Ranges": "bytes",
}


def _file_not_found(field=None):
    # Also for a file the caller may not read: its existence is not revealed.
    return error(400, "file_not_found", "There is no file with this id.", field)


def _image_size(f):
    """(MIME type, width, height) of a PNG, GIF, WebP or JPEG file, from its header; None if it is
    none of them, or its header is cut short."""
    head = f.read(30)
    size = None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        size = "image/png", *struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        size = "image/gif", *struct.unpack("<HH", head[6:10])
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) == 30:
        chunk, data = head[12:16], head[20:]
        if chunk == b"VP8 " and data[3:6] == b"\x9d\x01\x2a":  # a key frame: its size follows
            width, height = struct.unpack("<HH", data[6:10])
            size = "image/webp", width & 0x3FFF, height & 0x3FFF
        elif chunk == b"VP8L" and data[0] == 0x2F:  # lossless: 14 bits each, minus one
            bits = int.from_bytes(data[1:5], "little")
            size = "image/webp", (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
        elif chunk == b"VP8X":  # extended: the canvas, 24 bits each, minus one
            width, height = (int.from_bytes(data[n:n + 3], "little") + 1 for n in (4, 7))
            size = "image/webp", width, height
    elif head[:3] == b"\xff\xd8\xff":
        f.seek(2)
        size = _jpeg_size(f)
    return size if size and size[1] and size[2] else None


def _jpeg_size(f):
    """("image/jpeg", width, height) from a JPEG's frame header (SOFn), read segment by segment."""
    for _ in range(MAX_JPEG_SEGMENTS):
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # the end, or the scan, before any frame header
            return None
        if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # markers without a segment
            continue
        length = f.read(2)
        if len(length) < 2 or int.from_bytes(length, "big") < 2:
            return None
        if 0xC0 <= marker[0] <= 0xCF and marker[0] not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            frame = f.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return "image/jpeg", width, height
        f.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)
    return None


def _file_name(raw):
    """An upload's name as the API keeps it: NFC, no path, no control characters or bidirectional
    overrides, at most 255 characters (the end of the stem cut, the extension kept); "file" if empty."""
    name = re.split(r"[/\\]", unicodedata.normalize("NFC", raw or ""))[-1]
    name = "".join(c for c in name if unicodedata.category(c) != "Cc" and c not in BIDI_CONTROLS)
    if len(name) > MAX_FILE_NAME_CHARS:
        stem, dot, extension = name.rpartition(".")
        if not (stem and 1 <= len(extension) <= MAX_EXTENSION_CHARS):
            stem, dot, extension = name, "", ""
        name = stem[:MAX_FILE_NAME_CHARS - len(dot + extension)] + dot + extension
    return name or "file"


def _declared_type(upload):
    """A part's declared Content-Type if it is a well-formed type/subtype (lower-cased, without
    parameters), else application/octet-stream."""
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    return declared if MEDIA_TYPE.fullmatch(declared) else "application/octet-stream"


def _file_part():
    """The first part of a multipart body that has a file name, or None."""
    try:
        return next((part for part in bottle.request.files.values() if part.raw_filename is not None), None)
    except (bottle.HTTPError, ValueError, IndexError, KeyError):  # a malformed body
        return None


def _insert_file(conn, owner_id, name, declared_type, f, created_at):
    """Store a file from a seekable binary file object, a chunk at a time; its row (id, json)."""
    image = _image_size(f)
    content_type, width, height = image or (declared_type, None, None)
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    file_id = conn.execute(
        "INSERT INTO files (owner_id, name, content_type, size, width, height, etag, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, '', ?)",
        (owner_id, name, content_type, size, width, height, created_at),
    ).lastrowid
    digest = hashlib.sha256()
    if hasattr(conn, "blobopen"):  # Python 3.11+: written in place, a chunk at a time
        conn.execute("INSERT INTO file_contents (file_id, data) VALUES (?, zeroblob(?))", (file_id, size))
        with conn.blobopen("file_contents", "data", file_id) as blob:
            for chunk in iter(functools.partial(f.read, FILE_CHUNK_BYTES), b""):
                blob.write(chunk)
                digest.update(chunk)
    else:  # the whole file in memory once
        data = f.read()
        digest.update(data)
        conn.execute("INSERT INTO file_contents (file_id, data) VALUES (?, ?)", (file_id, data))
    conn.execute("UPDATE files SET etag = ? WHERE id = ?", ('"' + digest.hexdigest()[:32] + '"', file_id))
    return conn.execute("SELECT id, json FROM files WHERE id = ?", (file_id,)).fetchone()


def _own_files(conn, me, file_ids, now):
    """Rows (id, json) of files the caller uploaded and may send, in the order of `file_ids`."""
    if not file_ids:
        return []
    rows = {row["id"]: row for row in conn.execute(
        "SELECT id, json FROM files WHERE id IN (SELECT value FROM json_each(?)) AND owner_id = ?"
        " AND (created_at >= ? OR EXISTS (SELECT 1 FROM message_files WHERE file_id = files.id))",
        (_to_json(file_ids), me, _iso(now - UNSENT_FILE_SECONDS)),
    )}
    if len(rows) < len(file_ids):
        raise _file_not_found("file_ids")
    return [rows[file_id] for file_id in file_ids]


def _delete_unsent_files(conn, now, file_ids=None):
    """Delete the files older than a day that no message carries: of `file_ids`, or all of them."""
    unsent = "created_at < ? AND NOT EXISTS (SELECT 1 FROM message_files WHERE file_id = files.id)"
    cutoff = _iso(now - UNSENT_FILE_SECONDS)
    if file_ids is None:
        conn.execute("DELETE FROM files WHERE " + unsent, (cutoff,))
    elif file_ids:
        conn.execute("DELETE FROM files WHERE id IN (SELECT value FROM json_each(?)) AND " + unsent,
                     (_to_json(file_ids), cutoff))


@route("POST", "/files", upload=_body(["file"], file=dict(BINARY, description="Any file; name: file")),
       returns=_ref("File"), errors=("missing_field", "invalid_field", "payload_too_large"))
def upload_file(app, db, me):
    """Upload a file to send with messages (multipart/form-data, one file part); its file object."""
    limit = app.options.max_file_bytes
    too_large = error(413, "payload_too_large", f"A file is limited to {limit} bytes.")
    if bottle.request.content_length > limit + MULTIPART_OVERHEAD:
        raise too_large
    upload = _file_part()
    if upload is None:
        raise error(400, "missing_field", "Send the file as a file part of multipart/form-data.", "file")
    size = upload.file.seek(0, os.SEEK_END)
    if size > limit:
        raise too_large
    if size == 0:
        raise _invalid("file", "The file is empty.")
    upload.file.seek(0)
    with db.transaction() as conn:
        row = _insert_file(conn, me, _file_name(upload.raw_filename), _declared_type(upload), upload.file,
                           _iso(time.time()))
    return _json_text(row["json"])


def _readable_file(conn, me, file_id, now):
    """A file the caller may read (its uploader, or a member of a chat where it was sent), or None."""
    return conn.execute(
        "SELECT * FROM files AS f WHERE id = ? AND (EXISTS (SELECT 1 FROM message_files AS mf"
        "   JOIN messages AS m ON m.id = mf.message_id"
        "   JOIN chat_members AS cm ON cm.chat_id = m.chat_id AND cm.user_id = ? WHERE mf.file_id = f.id)"
        " OR (owner_id = ? AND (created_at >= ?"
        "   OR EXISTS (SELECT 1 FROM message_files WHERE file_id = f.id))))",
        (file_id, me, me, _iso(now - UNSENT_FILE_SECONDS)),
    ).fetchone()


def _content_disposition(kind, name):
    """inline or attachment, with the name as UTF-8 (filename*) and as ASCII for old clients."""
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


def _byte_range(header, size):
    """(start, end) of the one range a Range header asks for; None for the whole file (no header,
    a malformed one, or several ranges); raises 416 for a range wholly past the end."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or not (match[1] or match[2]):
        return None
    # int() refuses more than 4300 digits; anything past 20 is past every file's end.
    first, last = (int(digits[:20]) if digits else None for digits in match.groups())
    if first is None:  # the last `last` bytes
        start, end = max(size - last, 0), size if last else 0
    elif last is not None and last < first:
        return None  # not a range: the whole file
    else:
        start, end = first, size if last is None else min(last + 1, size)
    if start >= end:
        raise error(416, "range_not_satisfiable", f"The range lies past the file's end ({size} bytes).",
                    headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _file_chunks(db, file_id, start, end):
    """The bytes start..end of a file, a chunk at a time, from one borrowed connection."""
    with db.connection() as conn:
        if hasattr(conn, "blobopen"):
            try:
                blob = conn.blobopen("file_contents", "data", file_id, readonly=True)
            except sqlite3.OperationalError:  # deleted since the answer began
                return
            with blob:
                blob.seek(start)
                while start < end:
                    chunk = blob.read(min(FILE_CHUNK_BYTES, end - start))
                    start += len(chunk)
                    yield chunk
            return
        while start < end:  # substr() counts from 1
            row = conn.execute("SELECT substr(data, ?, ?) FROM file_contents WHERE file_id = ?",
                               (start + 1, min(FILE_CHUNK_BYTES, end - start), file_id)).fetchone()
            if not row or not row[0]:
                return
            start += len(row[0])
            yield row[0]


@route("GET", "/files/<file_id>", headers={"Range": _text(), "If-None-Match": _text(), "If-Range": _text()},
       returns=None, media={"*/*": BINARY}, errors=("file_not_found", "range_not_satisfiable"), answers={
           "206": {"description": "The range asked for, with Content-Range.",
                   "content": {"*/*": {"schema": BINARY}}},
           "304": NOT_MODIFIED})
def get_file(db, me, file_id):
    """A file's bytes, to its uploader and the members of chats it was sent to; Range, ETag and 304."""
    file_id = _path_id(file_id, "file_id")
    with db.connection() as conn:
        row = _readable_file(conn, me, file_id, time.time())
    if row is None:
        raise _file_not_found()
    disposition = _content_disposition("inline" if row["width"] is not None else "attachment", row["name"])
    headers = dict(FILE_HEADERS, ETag=row["etag"], **{"Content-Disposition": disposition})
    if _etag_matches(row["etag"]):
        return bottle.HTTPResponse(status=304, headers=headers)
    shown = SHOWN_TYPES.fullmatch(row["content_type"])
    content_type = row["content_type"] if shown else "application/octet-stream"
    size, span, status = row["size"], None, 200
    if _header("If-Range", row["etag"]) == row["etag"]:  # a range of the bytes the client has
        span = _byte_range(_header("Range"), size)
    if span:
        status = 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
    start, end = span or (0, size)
    headers["Content-Length"] = str(end - start)
    return bottle.HTTPResponse(_file_chunks(db, file_id, start, end), status, headers,
                               content_type=content_type)


# ---------------------------------------------------------------------------
# Updates (long polling)
# ---------------------------------------------------------------------------


# An update as stored: its type, the message, chat or user it shows as that
# is when the update is read, and the rest of it (ids, an emoji) as JSON.
Event = collections.namedtuple("Event", "type ref payload", defaults=(None, None))

# A page of a user's updates from an offset on, each as JSON text built by
# SQLite: a message, chat or user as it is now, or NULL when there is
# nothing to show (a deleted message, a chat the reader has left, a typing
# update too old or their own). The page's ids come first, from the index:
# the reader's own rows, and their chats' rows in the spans they were in.
UPDATES_QUERY = (
    """SELECT u.id, u.type,
           '{"update_id":' || u.id || ',"type":"' || u.type || '",' || CASE
           WHEN u.created_at < :since THEN NULL  -- expired, not yet pruned
           WHEN u.type IN ('message', 'message_edited') THEN
               CASE WHEN member.user_id IS NOT NULL THEN '"message":' || msg.json || '}' END
           WHEN u.type = 'chat' THEN
               (SELECT '"chat":' || chat || '}' FROM (""" + CHAT_QUERY + """
                 WHERE m.user_id = :reader AND m.chat_id = u.ref))
           WHEN u.type = 'user' THEN
               (SELECT '"user":' || """ + USER_OBJECT + """ || '}'
                  FROM (""" + SHOWN_USERS.format(viewer=":reader", where="x.id = u.ref") + """))
           WHEN u.type = 'typing' THEN
               CASE WHEN u.ref <> :reader AND u.created_at >= :typing_since THEN substr(u.payload, 2) END
           ELSE substr(u.payload, 2) END AS body
      FROM (SELECT id FROM updates WHERE user_id = :reader AND id >= :offset
            UNION ALL
            SELECT e.id FROM chat_spans AS s
              JOIN updates AS e ON e.chat_id = s.chat_id AND e.user_id IS NULL
                               AND e.id > s.after_id AND e.id >= :offset
                               AND (s.until_id IS NULL OR e.id <= s.until_id)
             WHERE s.user_id = :reader
            ORDER BY 1 LIMIT :limit) AS page
      JOIN updates AS u ON u.id = page.id
      LEFT JOIN messages AS msg ON msg.id = u.ref AND u.type IN ('message', 'message_edited')
      LEFT JOIN chat_members AS member ON member.chat_id = msg.chat_id AND member.user_id = :reader"""
)
LAST_UPDATE = "(SELECT coalesce(max(id), 0) FROM updates)"  # a span's bounds


def _open_spans(conn, chat_id, users):
    """Start the members' spans of a chat's events: they read what is written from now on."""
    conn.executemany("INSERT INTO chat_spans (user_id, chat_id, after_id) VALUES (?, ?, " + LAST_UPDATE + ")",
                     [(user, chat_id) for user in users])


def _close_span(conn, chat_id, user_id):
    """End a leaving member's span: what the chat's members are told from now on is not for them."""
    conn.execute("UPDATE chat_spans SET until_id = " + LAST_UPDATE
                 + " WHERE user_id = ? AND chat_id = ? AND until_id IS NULL", (user_id, chat_id))


class Feed:
    """This process's updates: stores, reads and prunes them, and wakes the polls that wait for them."""

    # A waiting poll sleeps on its user's condition. A publish after a commit
    # wakes only the users the commit wrote to (its chats' members), so a
    # send between two users costs nothing to the hundred others who wait.

    def __init__(self, db, max_waiting, retention_seconds):
        self.db = db
        self.max_waiting = max_waiting
        self.retention_seconds = retention_seconds
        self.waiting = 0
        self.waiting_of = collections.Counter()  # user id: their waiting polls and streams
        self._lock = threading.Lock()
        self._woken = {}  # user id: (condition, publishes that concerned them) while they wait
        self._written = threading.local()  # the users and chats this thread's transaction wrote to
        self.pruned_at = 0.0  # when this process last deleted expired updates
        self.closed = False
        self._typing = {}  # (chat id, user id): when this process last sent their typing true
        self.streams_ended = 0  # grows when every open stream must end

    def typing_is_news(self, chat_id, user_id, typing):
        """Whether a typing update is worth sending: not a true soon after a true (in this process)."""
        now = time.monotonic()
        with self._lock:
            if len(self._typing) > MAX_TYPING_KEPT:  # forget whoever stopped long ago
                self._typing = {key: at for key, at in self._typing.items()
                                if now - at < TYPING_REPEAT_SECONDS}
            if not typing:
                self._typing.pop((chat_id, user_id), None)
                return True
            if now - self._typing.get((chat_id, user_id), -math.inf) < TYPING_REPEAT_SECONDS:
                return False
            self._typing[chat_id, user_id] = now
            return True

    def typing_ended(self, chat_id, user_id):
        """A message arrived: a client stops showing its author as typing, so the next true is news."""
        with self._lock:
            self._typing.pop((chat_id, user_id), None)

    def _note(self, users=(), chats=()):
        written = self._written.__dict__
        written.setdefault("users", set()).update(users)
        written.setdefault("chats", set()).update(chats)

    def to_users(self, conn, events):
        """Store an update for each of some users ({user id: Event})."""
        self._insert(conn, [(user, None, event) for user, event in events.items()])
        self._note(users=events)

    def to_chat(self, conn, chat_id, event):
        """Store an update for every member of a chat, once: each reads it through their span."""
        self._insert(conn, [(None, chat_id, event)])
        self._note(chats=[chat_id])

    def _insert(self, conn, rows):
        """Store updates; now and then, prune what has expired."""
        now = time.time()
        conn.executemany(
            "INSERT INTO updates (user_id, chat_id, created_at, type, ref, payload)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(user, chat, now, event.type, event.ref, event.payload and _to_json(event.payload))
             for user, chat, event in rows],
        )
        if now >= self.pruned_at + min(PRUNE_SECONDS, self.retention_seconds):
            self.pruned_at = now
            # Ids grow with time, so the expired rows are the ones before the
            # oldest row still kept; the rows just written are always kept.
            conn.execute(
                "DELETE FROM updates WHERE id <"
                " (SELECT id FROM updates WHERE created_at >= ? ORDER BY id LIMIT 1)",
                (now - self.retention_seconds,),
            )
            conn.execute("DELETE FROM chat_spans WHERE until_id < (SELECT min(id) FROM updates)")
            # What else expires after a day goes at the same time (its readers skip it meanwhile).
            conn.execute("DELETE FROM sends WHERE sent_at < ?", (now - RETRY_SECONDS,))
            _delete_unsent_files(conn, now)

    def read(self, db, user_id, offset, limit):
        """A user's updates from `offset` on, at most `limit`: rows of (update id, type, JSON text)."""
        now = time.time()
        found = []
        with db.connection() as conn:
            cursor = conn.cursor()
            cursor.row_factory = None  # plain tuples: a page is many rows
            while len(found) < limit:  # again when some of a page had nothing to show
                wanted = limit - len(found)
                page = cursor.execute(UPDATES_QUERY, {
                    "reader": user_id, "offset": offset, "limit": wanted,
                    "since": now - self.retention_seconds, "typing_since": now - TYPING_SHOWN_SECONDS,
                }).fetchall()
                page.sort()  # by id: here, since SQLite would copy every body to sort them
                found += [row for row in page if row[2] is not None]
                if len(page) < wanted:
                    break
                offset = page[-1][0] + 1
        return found

    def generation(self, user_id):
        """How many publishes have concerned a waiting user: a wait after it sleeps until the next."""
        with self._lock:
            return self._woken[user_id][1] if user_id in self._woken else 0

    def publish(self):
        """Wake the waiting polls of the users this thread's transaction wrote to, after its commit."""
        written = self._written.__dict__
        users, chats = written.pop("users", set()), written.pop("chats", set())
        if chats and self._woken:  # only then who is in the chats matters
            with self.db.connection() as conn:
                for chat_id in chats:
                    users.update(row[0] for row in conn.execute(
                        "SELECT user_id FROM chat_members WHERE chat_id = ?", (chat_id,)))
        with self._lock:
            for user in users & self._woken.keys():
                condition, count = self._woken[user]
                self._woken[user] = condition, count + 1
                condition.notify_all()

    def wait(self, user_id, generation, timeout):
        """Sleep until a publish for this user after `generation`, a close, or the timeout."""
        with self._lock:
            condition, count = self._woken[user_id]
            if count == generation and not self.closed:
                condition.wait(timeout)

    @contextlib.contextmanager
    def waiter(self, user_id):
        """Yield whether this poll may wait: False when most threads already do, or when this
        user already has MAX_WAITING_PER_USER waiting, so that no one crowds out the others."""
        with self._lock:
            allowed = (self.waiting < self.max_waiting and self.waiting_of[user_id] < MAX_WAITING_PER_USER
                       and not self.closed)
            if allowed:
                self.waiting += 1
                self.waiting_of[user_id] += 1
                self._woken.setdefault(user_id, (threading.Condition(self._lock), 0))
        try:
            yield allowed
        finally:
            if allowed:
                with self._lock:
                    self.waiting -= 1
                    self.waiting_of[user_id] -= 1
                    if not self.waiting_of[user_id]:
                        del self.waiting_of[user_id], self._woken[user_id]

    def wake_all(self):
        """Wake every waiting poll and stream, to look again (their sessions may be gone)."""
        with self._lock:
            for user, (condition, count) in self._woken.items():
                self._woken[user] = condition, count + 1
                condition.notify_all()

    def end_streams(self):
        """End every open event stream now (a drop rule for them came into force)."""
        self.streams_ended += 1
        self.wake_all()

    def close(self):
        """End every wait now and refuse new ones (the server is stopping)."""
        with self._lock:
            self.closed = True
            for condition, _ in self._woken.values():
                condition.notify_all()


@route("GET", "/updates", errors=("invalid_field",),
       query={"offset": OFFSET, "timeout": TIMEOUT, "limit": UPDATES_LIMIT},
       returns=_object(["updates"], updates={"type": "array", "items": _ref("Update")}))
def get_updates(app, db, me):
    """New messages, chats and read marks since ?offset=, waiting up to ?timeout= seconds."""
    offset, timeout = _query_int("offset", OFFSET), _query_int("timeout", TIMEOUT)
    limit = _query_int("limit", UPDATES_LIMIT)
    if bottle.request.method == "HEAD":  # no body to wait for: hold no thread
        timeout = 0
    feed = app.feed
    deadline = time.monotonic() + timeout
    with feed.waiter(me) as may_wait:
        while True:
            generation = feed.generation(me)
            updates = feed.read(db, me, offset, limit)
            remaining = deadline - time.monotonic()
            if updates or not may_wait or remaining <= 0 or feed.closed:
                return _json_text('{"updates":[' + ",".join(body for _, _, body in updates) + "]}")
            # No connection is held while waiting: it went back to the pool.
            feed.wait(me, generation, min(remaining, POLL_RECHECK_SECONDS))


@route("GET", "/updates/stream", query={"offset": OFFSET}, headers={"Last-Event-ID": LAST_EVENT_ID},
       errors=("invalid_field",), returns=None,
       media={"text/event-stream": {"type": "string", "description": "id: the update_id, event: its type,"
                                                                    " data: the Update as JSON"}})
def stream_updates(app, db, session):
    """The same updates as Server-Sent Events, for a browser's EventSource; resumes after Last-Event-ID."""
    offset = _query_int("offset", OFFSET)
    header = _header("Last-Event-ID", None)
    if header is not None:  # a reconnecting EventSource: it wins over ?offset=
        last_event_id = _integer(header, LAST_EVENT_ID["minimum"], LAST_EVENT_ID["maximum"])
        if last_event_id is None:
            raise _invalid("Last-Event-ID", "'Last-Event-ID' must be the id of an update.")
        offset = last_event_id + 1
    bottle.response.content_type = "text/event-stream; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-cache")
    if bottle.request.method == "HEAD":  # no body to stream: hold no thread for one
        return ""
    return _event_stream(app.feed, db, session, offset, app.options)


def _event_stream(feed, db, session, offset, options):
    """Yield a user's updates from `offset` on as events, until the stream's time or session is up."""
    # Runs after the handler has returned, so it takes everything as arguments.
    ended = feed.streams_ended
    with feed.waiter(session.user_id) as may_wait:
        yield f"retry: {STREAM_RETRY_MS}\n\n"
        started = written = time.monotonic()
        while True:
            generation = feed.generation(session.user_id)
            if not _session_lives(db, session) or feed.streams_ended != ended:  # logged out, or a drop rule
                return
            updates = feed.read(db, session.user_id, offset, MAX_PAGE)
            for update_id, kind, body in updates:
                yield f"id: {update_id}\nevent: {kind}\ndata: {body}\n\n"
            now = time.monotonic()
            if updates:
                offset, written = updates[-1][0] + 1, now
                continue
            if not may_wait:  # most threads, or this user's share, are waiting already: come back later
                yield f"retry: {STREAM_BUSY_RETRY_MS}\n\n"
                return
            if feed.closed or now - started >= options.stream_seconds:
                return
            if now - written >= options.stream_heartbeat_seconds:
                yield ": still here\n\n"  # a comment: EventSource ignores it
                written = now
            # No connection is held while waiting: it went back to the pool.
            feed.wait(session.user_id, generation,
                      min(POLL_RECHECK_SECONDS, started + options.stream_seconds - now,
                          written + options.stream_heartbeat_seconds - now))


# ---------------------------------------------------------------------------
# Fixtures and demo data
# ---------------------------------------------------------------------------

DEMO_PICTURE_SIZE = (160, 120)


def _demo_picture():
    """A PNG of a red kite in a blue sky over green grass, drawn pixel by pixel and packed with zlib."""
    width, height = DEMO_PICTURE_SIZE

    def colour(x, y):
        if abs(x - 100) + abs(y - 40) < 22:  # the kite, a diamond
            return b"\xe0\x30\x30"
        if y > 90:
            return b"\x4c\xa0\x3c"  # grass
        return bytes((110 + y // 2, 170 + y // 2, 255))  # sky, lighter to the horizon

    # Each row: filter type 0, then its pixels as RGB.
    rows = b"".join(b"\0" + b"".join(colour(x, y) for x in range(width)) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def demo_fixtures():
    """The demo data (--demo) as fixtures: what the README shows, to copy and change."""
    ann, bob, carol, dave = (f"{name}@example.com" for name in ("ann", "bob", "carol", "dave"))
    picture = {"name": "kite.png", "base64": base64.b64encode(_demo_picture()).decode()}
    picnic = {"name": "picnic-list.txt", "base64": base64.b64encode(
        b"Sandwiches\nLemonade\nFrisbee\nA blanket\n").decode()}
    return {
        "users": [
            {"email": ann, "password": DEMO_PASSWORD, "username": "ann", "name": "Ann Lee",
             "status": "Drawing dragons", "phone": "+1 555 0101"},
            {"email": bob, "password": DEMO_PASSWORD, "username": "bob", "name": "Bob Stone",
             "status": "At the climbing gym"},
            {"email": carol, "password": DEMO_PASSWORD, "username": "carol", "name": "Carol Díaz",
             "phone": "+34 600 123 456"},
            {"email": dave, "password": DEMO_PASSWORD, "username": "dave", "name": "Dave Kim",
             "status": "Offline until Monday"},
        ],
        "chats": [
            {"members": [bob, dave], "messages": [
                {"from": dave, "text": "Did you push the fix for the login page?"},
                {"from": bob, "text": "Yes, it's on main since this morning."},
                {"from": dave, "text": "Thanks, I'll test it on Monday."}]},
            {"members": [ann, carol], "messages": [
                {"from": ann, "text": "Carol, park on Saturday at 10? Bob is coming."},
                {"from": carol, "text": "Count me in!"},
                {"from": carol, "text": "Can I bring my sister?"}]},
            {"members": [ann, bob], "messages": [
                {"from": bob, "text": "Hey Ann! Are we still on for Saturday?"},
                {"from": ann, "text": "Yes! 10 am at the park entrance?"},
                {"from": bob, "text": "Perfect. I'll bring the frisbee."},
                {"from": ann, "text": "And I'll bring sandwiches 🥪", "files": [picnic]},
                {"from": bob, "text": "Deal. Should we ask Carol too?"},
                {"from": ann, "text": "Already did, she's in."},
                {"from": bob, "text": "Great, see you there!"}]},
            {"name": "Saturday in the park", "members": [ann, bob, carol], "messages": [
                {"from": ann, "text": "A group for Saturday, so the three of us can plan together."},
                {"from": bob, "text": "I'll bring the frisbee and a ball.", "edited": True},
                {"from": carol, "text": "My sister is coming too, with her kite!",
                 "reactions": {"🪁": [ann]}},
                {"from": carol, "text": "This is the kite.", "files": [picture],
                 "reactions": {"👍": [bob, carol]}},
                {"from": ann, "text": "Lovely. See you all at 10 at the entrance.", "reply_to": 3}]},
        ],
    }


class FixturesError(ValueError):
    """Fixtures that cannot be loaded: `path` names the entry at fault (chats[1].messages[3].from)."""

    def __init__(self, path, message):
        # A key from the fixtures may hold a lone surrogate, which no answer can encode.
        path, message = (text.encode("utf-8", "backslashreplace").decode() for text in (path, message))
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


def _entry(value, path, keys=None, required=()):
    """A fixtures object with only these keys (a typo must not pass silently), the required ones there."""
    if not isinstance(value, dict):
        raise FixturesError(path, "must be an object")
    for key in value:
        if keys is not None and key not in keys:
            raise FixturesError(f"{path}.{key}" if path else key, "is not a key of this entry")
    for key in required:
        if value.get(key) is None:
            raise FixturesError(f"{path}.{key}" if path else key, "is required")
    return value


def _entries(value, path):
    if value is None:
        return []
    if not isinstance(value, list):
        raise FixturesError(path, "must be a list")
    return value


def _checked(path, check, *args, **kwargs):
    """Run one of the API's own checks on a fixtures entry; its complaint, with the entry's path."""
    try:
        return check(*args, **kwargs)
    except bottle.HTTPResponse as answer:
        body = json.loads(answer.body)
        field = body.get("field")
        raise FixturesError(f"{path}.{field}" if field else path, body["message"]) from None


def _fixture_file(spec, path, base, max_bytes):
    """A fixtures file entry: (name, declared type, bytes) from a path or {"name", "base64"}."""
    if isinstance(spec, str):
        if base is None:
            raise FixturesError(path, "files are inline here: {\"name\": ..., \"base64\": ...}")
        if os.path.isabs(spec):
            raise FixturesError(path, "a file's path is relative to the fixtures file")
        try:
            with open(os.path.join(base, spec), "rb") as f:
                data = f.read(max_bytes + 1)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            reason = getattr(exc, "strerror", None) or exc
            raise FixturesError(path, f"cannot read {spec!r}: {reason}") from None
        name = spec
    else:
        _entry(spec, path, {"name", "base64"}, ("name", "base64"))
        name = spec["name"]
        try:
            data = base64.b64decode(spec["base64"], validate=True)
        except (TypeError, ValueError):
            raise FixturesError(f"{path}.base64", "is not base64") from None
    _checked(path, _string, {"name": name}, "name", required=True)  # a string, no NUL or lone surrogate
    if not data:
        raise FixturesError(path, "the file is empty")
    if len(data) > max_bytes:
        raise FixturesError(path, f"the file is over {max_bytes} bytes")
    name = _file_name(name)
    return name, mimetypes.guess_type(name)[0] or "application/octet-stream", data


def _or_empty(value):
    """An optional object of fixtures: {} when absent or null (other values are checked as given)."""
    return {} if value is None else value


def fixture_emails(fixtures):
    """The folded emails of the fixtures' users (a database they filled has exactly these)."""
    users = _entries(_entry(fixtures, "", {"users", "chats"}).get("users"), "users")
    return {_fold(user["email"].strip()) for user in users
            if isinstance(user, dict) and isinstance(user.get("email"), str)}


def load_fixtures(app, conn, fixtures, base=None):
    """Fill an empty database with fixtures in one transaction (`conn`'s); FixturesError if they are wrong."""
    _entry(fixtures, "", {"users", "chats"})
    now = time.time()
    hashes = app.password_hashes  # one hash per password, kept: a reset does not pay for them again
    emails = {}
    for n, user in enumerate(_entries(fixtures.get("users"), "users")):
        path = f"users[{n}]"
        _entry(user, path, {"email", "password", *USER_FIELDS}, ("email", "password"))
        email = _checked(path, _user_field, user, "email", required=True)
        password = _checked(path, _password, user, required=True)
        fields = {field: _checked(path, _user_field, user, field, required=False) or ""
                  for field in ("username", "name", "status", "phone")}
        if _fold(email) in emails:
            raise FixturesError(f"{path}.email", f"{email!r} is there twice")
        if fields["username"]:
            _checked(path, _taken, conn, username=fields["username"])
        username = fields.pop("username") or _free_username(conn, _username_from_email(email))
        if password not in hashes:
            hashes[password] = hash_password(password, app.options.password_iterations)
        emails[_fold(email)] = _insert_user(conn, email, username, hashes[password], **fields,
                                            created_at=_iso(now - DAY_SECONDS))
    chats, messages = [], []  # (chat id, member ids, path, its messages' entries)
    for n, chat in enumerate(_entries(fixtures.get("chats"), "chats")):
        path = f"chats[{n}]"
        _entry(chat, path, {"name", "members", "messages", "read"}, ("members",))
        members = []
        for m, email in enumerate(_entries(chat["members"], f"{path}.members")):
            user = emails.get(_fold(email)) if isinstance(email, str) else None
            if user is None:
                raise FixturesError(f"{path}.members[{m}]", f"{email!r} is not a user of the fixtures")
            if user in members:
                raise FixturesError(f"{path}.members[{m}]", f"{email!r} is there twice")
            members.append(user)
        if chat.get("name") is None:
            if len(members) != 2:
                raise FixturesError(f"{path}.members", "a dialog (a chat without a name) has two members")
            low, high = sorted(members)
            if _exists(conn, "SELECT 1 FROM chats WHERE user_low = ? AND user_high = ?", (low, high)):
                raise FixturesError(f"{path}.members", "these two have a dialog already")
            chat_id = _insert_chat(conn, None, members, "")
        else:
            name = _checked(path, _visible_text, chat, "name", MAX_CHAT_NAME_CHARS)
            if not 1 <= len(members) <= MAX_GROUP_MEMBERS:
                raise FixturesError(f"{path}.members", f"a group has 1 to {MAX_GROUP_MEMBERS} members")
            chat_id = _insert_chat(conn, name, members, "")
        chats.append((chat_id, members, path, chat))
        entries = _entries(chat.get("messages"), f"{path}.messages")
        for m, message in enumerate(entries):
            messages.append((chat_id, members, f"{path}.messages[{m}]", m, message))
    # Without minutes_ago, a minute apart in file order, the last a minute ago.
    spaced = sum(1 for *_, message in messages
                 if isinstance(message, dict) and message.get("minutes_ago") is None)
    timed = []
    for chat_id, members, path, m, message in messages:
        _entry(message, path, {"from", "text", "files", "reply_to", "reactions", "edited", "minutes_ago"},
               ("from",))
        minutes = message.get("minutes_ago")
        if minutes is None:
            minutes, spaced = spaced, spaced - 1
        elif type(minutes) not in (int, float) or not 0 <= minutes <= 10**7:
            raise FixturesError(f"{path}.minutes_ago", "must be a number of minutes, 0 or more")
        timed.append((now - minutes * 60, chat_id, members, path, m, message))
    timed.sort(key=lambda entry: entry[0])  # ids follow the times, across the whole file
    ids = {}  # (chat id, index): message id
    for sent, chat_id, members, path, m, message in timed:
        author = emails.get(_fold(message["from"])) if isinstance(message["from"], str) else None
        if author not in members:
            raise FixturesError(f"{path}.from", f"{message['from']!r} is not a member of this chat")
        specs = enumerate(_entries(message.get("files"), f"{path}.files"))
        given = [_fixture_file(spec, f"{path}.files[{k}]", base, app.options.max_file_bytes)
                 for k, spec in specs]
        files = [_insert_file(conn, author, name, kind, io.BytesIO(data), _iso(sent))
                 for name, kind, data in given]
        text = _checked(path, _message_text, message, has_files=bool(files))
        ids[chat_id, m] = message_id = _insert_message(conn, chat_id, author, text, _iso(sent), files)[0]
        if message.get("edited") is not None:
            if not isinstance(message["edited"], bool):
                raise FixturesError(f"{path}.edited", "must be true or false")
            if message["edited"]:
                conn.execute("UPDATE messages SET edited_at = ? WHERE id = ?",
                             (_iso(min(sent + 30, now)), message_id))
        reactions = _entry(_or_empty(message.get("reactions")), f"{path}.reactions")
        for emoji, who in reactions.items():
            emoji = _checked(f"{path}.reactions", _emoji, {"emoji": emoji})
            for k, email in enumerate(_entries(who, f"{path}.reactions.{emoji}")):
                user = emails.get(_fold(email)) if isinstance(email, str) else None
                if user not in members:
                    raise FixturesError(f"{path}.reactions.{emoji}[{k}]",
                                        f"{email!r} is not a member of this chat")
                if _exists(conn, "SELECT 1 FROM reactions WHERE message_id = ? AND user_id = ?",
                           (message_id, user)):
                    raise FixturesError(f"{path}.reactions.{emoji}[{k}]", "one reaction per user and message")
                conn.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (?, ?, ?)",
                             (message_id, user, emoji))
        if reactions:
            _write_reactions(conn, message_id)
    for _, chat_id, _, path, m, message in timed:
        reply_to = message.get("reply_to")
        if reply_to is not None:
            if type(reply_to) is not int or not 0 <= reply_to < m:
                raise FixturesError(f"{path}.reply_to", "must be the index of an earlier message here")
            conn.execute("UPDATE messages SET reply_to_id = ? WHERE id = ?",
                         (ids[chat_id, reply_to], ids[chat_id, m]))
    for chat_id, members, path, chat in chats:
        order = _first_column(conn, "SELECT id FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,))
        first = conn.execute("SELECT min(created_at) FROM messages WHERE chat_id = ?",
                             (chat_id,)).fetchone()[0]
        conn.execute("UPDATE chats SET created_at = ?, last_message_id = ?, message_count = ?,"
                     " opened_after = coalesce(?, " + OPENED_NOW + ") WHERE id = ?",
                     (first or _iso(now), order[-1] if order else None, len(order), 0 if order else None,
                      chat_id))
        read = _entry(_or_empty(chat.get("read")), f"{path}.read")
        given = {}  # member id: how many of the chat's messages they have read
        for email, count in read.items():
            user = emails.get(_fold(email)) if isinstance(email, str) else None
            if user not in members:
                raise FixturesError(f"{path}.read.{email}", "is not a member of this chat")
            if user in given:
                raise FixturesError(f"{path}.read.{email}", "this member is there twice")
            if type(count) is not int or not 0 <= count <= len(order):
                raise FixturesError(f"{path}.read.{email}", f"must be a count of messages, 0 to {len(order)}")
            given[user] = count
        for user in members:
            if user in given:
                mark = order[given[user] - 1] if given[user] else 0
            else:  # up to their own last message
                mark = conn.execute("SELECT coalesce(max(id), 0) FROM messages"
                                    " WHERE chat_id = ? AND author_id = ?", (chat_id, user)).fetchone()[0]
            conn.execute(
                "UPDATE chat_members SET last_read_id = ?, seen_count = (SELECT count(*) FROM messages"
                " WHERE chat_id = ? AND (id <= ? OR author_id = ?)), posted = (SELECT count(*) FROM messages"
                " WHERE chat_id = ? AND author_id = ?) WHERE chat_id = ? AND user_id = ?",
                (mark, chat_id, mark, user, chat_id, user, chat_id, user))


def _read_fixtures(path):
    """Fixtures from a JSON file; FixturesError naming the file if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise FixturesError("", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def seed(app):
    """Fill an empty database with the app's fixtures (or the demo's): True if it did, False if the
    database already holds exactly their users (a restart), FixturesError if it holds others."""
    fixtures, base = app.fixtures
    with app.db.transaction() as conn:
        users = {row[0] for row in conn.execute("SELECT email_key FROM users")}
        if users:
            if users == fixture_emails(fixtures):
                return False
            raise FixturesError("", "the database has users of its own: fixtures fill an empty one")
        load_fixtures(app, conn, fixtures, base)
    return True


def _insert_chat(conn, name, members, created_at):
    """A dialog (no name) or a group (its first member the owner) of fixtures, its members in; its id."""
    if name is None:
        low, high = sorted(members)
        chat_id = conn.execute(
            "INSERT INTO chats (type, user_low, user_high, created_at, opened_after)"
            " VALUES ('dialog', ?, ?, ?, 0)",
            (low, high, created_at),
        ).lastrowid
    else:
        chat_id = conn.execute(
            "INSERT INTO chats (type, name, owner_id, created_at, opened_after)"
            " VALUES ('group', ?, ?, ?, 0)",
            (name, members[0], created_at),
        ).lastrowid
    conn.executemany("INSERT INTO chat_members (chat_id, user_id, joined) VALUES (?, ?, ?)",
                     [(chat_id, user, joined) for joined, user in enumerate(members)])
    _open_spans(conn, chat_id, members)
    return chat_id


# ---------------------------------------------------------------------------
# Test routes (--test-routes): reset, the request log, faults
# ---------------------------------------------------------------------------


def reset(app, fixtures=None, base=None):
    """Empty the database, end every session and stream, ids from 1 again, then load `fixtures`
    (else the app's own); FixturesError, and nothing changed, if they are wrong."""
    if fixtures is None and app.fixtures is not None:
        fixtures, base = app.fixtures
    with app.db.transaction() as conn:
        # Deleting the users cascades to everything that belongs to them; groups,
        # the search words and the login failures belong to no one.
        conn.execute("DELETE FROM updates")
        conn.execute("DELETE FROM users")  # with no rows left, ids start at 1 again
        conn.execute("DELETE FROM chats")
        conn.execute("DELETE FROM messages_search")
        conn.execute("DELETE FROM login_failures")
        conn.execute("DELETE FROM sqlite_sequence")  # message and file ids too
        if fixtures is not None:
            load_fixtures(app, conn, fixtures, base)
    app.feed.wake_all()  # every stream sees its session gone, and ends


def reset_database(app):
    """Empty the database, then load the fixtures in the body, or the server's own (test route)."""
    body = _json_body()
    try:
        reset(app, body or None)  # a body's files are inline
    except FixturesError as exc:
        raise error(400, "invalid_fixtures", exc.message, exc.path or None) from None
    return {}


def _masked(value):
    """A logged body with every password, at any depth, as "***"."""
    if isinstance(value, dict):
        return {key: "***" if key == "password" else _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def _logged_body(environ):
    """A request's JSON body as parsed, for the log (None when it is none, not JSON, or multipart)."""
    multipart = environ.get("CONTENT_TYPE", "").startswith("multipart/")
    if multipart or bottle.request.content_length > MAX_JSON_BYTES:
        return None
    try:
        data = bottle.request.body.read(MAX_JSON_BYTES + 1)
    except (bottle.HTTPError, ValueError, OSError):
        return None
    try:
        return _masked(json.loads(data.decode("utf-8"))) if data.strip() else None
    except (ValueError, RecursionError):
        return None


def _fault_for(app, method, path):
    """The first rule in force that matches a request and applies now (its use counted), or None."""
    with app.test_lock:
        for rule in app.faults:
            if rule.get("method", method) != method or not rule["pattern"].fullmatch(path):
                continue
            if rule.get("times") == 0 or ("rate" in rule and random.random() >= rule["rate"]):
                continue  # used up, or passed over this time: the next rules are tried
            if "times" in rule:
                rule["times"] -= 1
            return rule
    return None


def _observed(app, wsgi, environ, start_response):
    """The app as a WSGI callable with its test routes on: faults applied, requests logged."""
    method, raw_path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    path = raw_path.encode("latin-1").decode("utf-8", "replace")
    if path.startswith("/__") or method == "OPTIONS":
        return wsgi(environ, start_response)
    started = time.perf_counter()
    bottle.request.bind(environ)  # for what follows when no route runs: CORS, the session, the body
    rule = _fault_for(app, method, path)
    answer = {}

    def start(status, headers, exc_info=None):
        answer["status"] = int(status.split()[0])
        return start_response(status, headers, exc_info)

    session = None  # the one the request carried (a logout ends it)
    with contextlib.suppress(bottle.HTTPResponse):
        session = _session(app.db)
    if rule and rule.get("delay_ms"):
        time.sleep(rule["delay_ms"] / 1000)
    if rule and rule.get("drop"):
        # waitress takes this for a client gone, and closes the connection unanswered.
        raise waitress.channel.ClientDisconnected("a drop rule of PUT /__faults")
    if rule and rule.get("status"):
        status = rule["status"]
        headers = [("Content-Type", JSON_TYPE), ("Vary", "Origin")]
        headers += [("Retry-After", "1")] if status == 503 else []
        origin = _cors_origin(app.options.cors_origins)
        if origin:  # so that a browser client can read the fault, as any error
            headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"),
                        ("Access-Control-Expose-Headers", "Retry-After, ETag")]
        start(f"{status} {bottle.HTTP_CODES.get(status, 'Injected Fault')}", headers)
        out = [_error_body("injected_fault", f"A fault rule of PUT /__faults answered {status}.").encode()]
    else:
        out = wsgi(environ, start)
    entry = {
        "id": None, "at": _iso(time.time()), "method": method, "path": path,
        "query": environ.get("QUERY_STRING", ""), "status": answer.get("status"),
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        "user_id": session and session.user_id, "body": _logged_body(environ)}
    with app.test_lock:  # ids in the log's order; and a deque may not grow while it is copied
        entry["id"] = next(app.request_ids)
        app.requests_log.append(entry)
    return out


FAULT_KEYS = {"method", "path", "status", "delay_ms", "drop", "times", "rate"}


def _encodes(text):
    """Whether text is valid Unicode (no lone surrogate), as every answer must be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fault_rules(body):
    """The rules of a PUT /__faults body, checked: missing_field or invalid_field naming the one at fault."""
    rules = body.get("faults")
    if rules is None:
        raise _missing("faults")
    if not isinstance(rules, list):
        raise _invalid("faults", "'faults' must be a list of rules.")
    checked = []
    for n, rule in enumerate(rules):
        where = f"faults[{n}]"
        if not isinstance(rule, dict):
            raise _invalid(where, "A rule is an object.")
        for key in rule:
            if key not in FAULT_KEYS:
                raise _invalid(f"{where}.{key}", f"'{key}' is not a key of a fault rule.")
        if rule.get("path") is None:
            raise _missing(f"{where}.path")
        kept = {key: value for key, value in rule.items() if value is not None}
        checks = {"method": lambda v: isinstance(v, str) and v.isascii() and v.isupper(),
                  "path": lambda v: isinstance(v, str) and v.startswith("/") and _encodes(v),
                  "status": lambda v: type(v) is int and 400 <= v <= 599,
                  "delay_ms": lambda v: type(v) is int and 0 <= v <= 60000,
                  "drop": lambda v: isinstance(v, bool),
                  "times": lambda v: type(v) is int and v >= 1,
                  "rate": lambda v: type(v) in (int, float) and 0 <= v <= 1}
        for key, value in kept.items():
            if not checks[key](value):
                raise _invalid(f"{where}.{key}", f"'{key}' has a value a rule cannot have.")
        if not (kept.get("status") or "delay_ms" in kept or kept.get("drop")):
            raise _invalid(where, "A rule needs a 'status', a 'delay_ms' or 'drop': true.")
        # * stands for one path segment; everything else is literal.
        kept["pattern"] = re.compile("[^/]*".join(re.escape(part) for part in kept["path"].split("*")))
        checked.append(kept)
    return checked


def _shown_rules(app):
    return {"faults": [{key: value for key, value in rule.items() if key != "pattern"}
                       for rule in app.faults]}


def get_faults(app):
    """The fault rules in force (test route)."""
    with app.test_lock:
        return _shown_rules(app)


def put_faults(app):
    """Replace the fault rules in force (test route)."""
    rules = _fault_rules(_json_body())
    with app.test_lock:
        app.faults[:] = rules
        shown = _shown_rules(app)
    if any(rule.get("drop") and rule.get("method", "GET") == "GET"
           and rule["pattern"].fullmatch("/updates/stream") for rule in rules):
        app.feed.end_streams()
    return shown


def list_requests(app):
    """The latest requests the server answered, oldest first (test route)."""
    limit = _query_int("limit", REQUEST_LOG_LIMIT)
    with app.test_lock:
        return {"requests": list(app.requests_log)[-limit:]}


def clear_requests(app):
    """Empty the request log (test route)."""
    with app.test_lock:
        app.requests_log.clear()
    return {}


def _install_test_routes(app, everything):
    """Add POST /__reset, and with `everything` the request log and the fault rules."""
    public = Contract(public=True)
    app.route("/__reset", "POST", reset_database, contract=public)
    if not everything:
        return
    app.requests_log = collections.deque(maxlen=MAX_LOGGED_REQUESTS)
    app.request_ids = itertools.count(1)
    app.faults, app.test_lock = [], threading.Lock()  # the rules, and the log too
    app.route("/__requests", "GET", list_requests, contract=public)
    app.route("/__requests", "DELETE", clear_requests, contract=public)
    app.route("/__faults", "GET", get_faults, contract=public)
    app.route("/__faults", "PUT", put_faults, contract=public)
    app.wsgi = functools.partial(_observed, app, app.wsgi)


# ---------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------


def _prefers_json():
    """Whether the Accept header ranks application/json above text/html."""
    quality = {}
    for item in bottle.request.environ.get("HTTP_ACCEPT", "").split(","):
        media, *params = [part.strip() for part in item.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    return quality.get("application/json", 0.0) > quality.get("text/html", 0.0)


def _route_path(rule):
    """A Bottle rule as the README writes it: /chats/<chat_id> is /chats/{chat_id}."""
    return rule.replace("<", "{").replace(">", "}")


INDEX = _object(["name", "version", "api", "routes"], name=_text(), version=_text(), api=_text(),
                routes={"type": "array", "items": _object(["method", "path", "description"], method=_text(),
                                                           path=_text(), description=_text())})


@route("GET", "/", public=True, returns=INDEX, media={"text/html": {"type": "string"}})
def index(app):
    """This page: the name, version and every route (JSON when Accept asks for it)."""
    routes = [
        {"method": r.method, "path": _route_path(r.rule), "description": (r.callback.__doc__ or "").strip()}
        for r in app.routes
    ]
    if _prefers_json():
        return {"name": "messenger", "version": __version__, "api": "/openapi.json", "routes": routes}
    rows = "\n".join(
        f"<tr><td>{r['method']}</td><td><code>{html.escape(r['path'])}</code></td>"
        f"<td>{html.escape(r['description'])}</td></tr>"
        for r in routes
    )
    bottle.response.content_type = "text/html; charset=utf-8"
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>messenger</title></head>"
        f"<body><h1>messenger {__version__}</h1>"
        "<p>A messenger backend: a JSON API. Log in with <code>POST /login</code>. The API's"
        " description: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI 3.1).</p>"
        f"<table>{rows}</table></body></html>"
    )


@route("GET", "/openapi.json", public=True, returns={
    "type": "object", "required": ["openapi", "paths"],
    "properties": {"openapi": {"const": "3.1.0"}, "paths": {"type": "object"}}})
def openapi(app):
    """This API's description, OpenAPI 3.1, for API tools and generated clients."""
    parts = bottle.request.urlparts
    return openapi_document(app, f"{parts.scheme}://{parts.netloc}")


def openapi_document(app, server_url):
    """The OpenAPI 3.1 description of an app's routes, built from their contracts."""
    paths, names = {}, collections.Counter(r.callback.__name__ for r in app.routes)
    for r in app.routes:
        if r.rule.startswith("/__"):
            continue  # the test routes are not the API a client is written against
        contract = r.config.get("contract") or Contract()
        name = r.callback.__name__
        operation_id = name if names[name] == 1 else name + re.sub(r"\W+", "_", r.rule)
        paths.setdefault(_route_path(r.rule), {})[r.method.lower()] = _operation(r, contract, operation_id)
    return {
        "openapi": "3.1.0",
        "info": {"title": "messenger", "version": __version__,
                 "license": {"name": "MIT", "identifier": "MIT"},
                 "description": "A messenger backend: users, sessions, avatars, dialogs and groups,"
                                " messages, read marks, search and updates."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                        "description": "The cookie POST /login sets."}}},
        "security": [{"session": []}],
    }


def _operation(r, contract, operation_id):
    """One route's operation object."""
    summary = (r.callback.__doc__ or "").strip()
    path_names = re.findall(r"<(\w+)>", r.rule)
    parameters = (
        [{"name": name, "in": "path", "required": True, "schema": (contract.path_params or {}).get(name, ID)}
         for name in path_names]
        + [{"name": name, "in": "query", "required": name == "query", "schema": schema}
           for name, schema in (contract.query or {}).items()]
        + [{"name": name, "in": "header", "required": False, "schema": schema}
           for name, schema in (contract.headers or {}).items()]
    )
    content = {"application/json": {"schema": contract.returns}} if contract.returns else {}
    content.update({media: {"schema": schema} for media, schema in (contract.media or {}).items()})
    responses = {"200": {"description": "Success.", "content": content}, **(contract.answers or {})}
    errors = set(contract.errors) | {"internal_error"}
    if "db" in inspect.signature(r.callback).parameters or not contract.public:
        errors.add("unavailable")
    if path_names or contract.query:
        errors.add("invalid_field")
    if contract.body:
        errors |= {"invalid_json", "payload_too_large"}
    if not contract.public:
        errors.add("not_authorized")
    for status in sorted({ERROR_STATUS[mnemonic] for mnemonic in errors}):
        mnemonics = sorted(m for m in errors if ERROR_STATUS[m] == status)
        responses[str(status)] = {"description": ", ".join(mnemonics), "content": {"application/json": {
            "schema": {"allOf": [_ref("Error"), {"properties": {"error": {"enum": mnemonics}}}]}}}}
    operation = {"operationId": operation_id, "summary": summary, "parameters": parameters,
                 "responses": responses}
    if contract.body or contract.upload:
        media, schema = ("application/json", contract.body) if contract.body else (
            "multipart/form-data", contract.upload)
        operation["requestBody"] = {"required": bool(schema.get("required", True)),
                                    "content": {media: {"schema": schema}}}
    if contract.public:
        operation["security"] = []
    return operation


def make_app(db=DEFAULT_DB, **options):
    """Build a new messenger WSGI application on the SQLite database `db`, with Options."""
    # An unknown option is a TypeError, a bad value a ValueError, before the
    # database is opened.
    app = bottle.Bottle()
    app.options = options = Options(**options)
    app.db = Database(db)
    threads = options.threads
    # Keep a quarter of the threads free of long polls: at least two, or the
    # one other thread there is, and never none.
    app.feed = Feed(app.db, max_waiting=threads - max(threads // 4, min(2, threads - 1), 1),
                    retention_seconds=options.updates_hours * HOUR_SECONDS)
    app.warned_origins = set()
    app.default_error_handler = functools.partial(_bottle_error_page, app)
    app.uninstall(bottle.JSONPlugin)
    app.install(bottle.JSONPlugin(json_dumps=_to_json))
    app.install(_Context())
    app.add_hook("before_request", _check_path_encoding)
    app.add_hook("before_request", functools.partial(_answer_preflight, options))
    app.add_hook("before_request", functools.partial(_delay_response, options))
    app.add_hook("after_request", functools.partial(_add_cors_headers, app))
    for method, path, handler, contract in ROUTES:
        app.route(path, method, handler, contract=contract)
    if options.allow_reset or options.test_routes:
        _install_test_routes(app, everything=options.test_routes)
    app.password_hashes = {}  # fixtures' passwords, hashed once
    app.fixtures = _app_fixtures(options)
    try:
        app.demo_seeded = app.fixtures is not None and seed(app)
    except BaseException:
        app.db.close()
        raise
    return app


def _app_fixtures(options):
    """(fixtures, the directory their file paths start from) for the options, or None."""
    if options.demo:
        return demo_fixtures(), None
    if isinstance(options.fixtures, dict):
        return options.fixtures, os.getcwd()
    if options.fixtures is not None:
        return _read_fixtures(options.fixtures), os.path.dirname(os.path.abspath(options.fixtures))
    return None


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


def _with_access_log(app):
    """Wrap a WSGI app to log one line per request: method, path, status, milliseconds."""

    def logged(environ, start_response):
        started = time.perf_counter()
        # Read before the app runs: Bottle rewrites PATH_INFO while it routes.
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")

        def start(status, headers, exc_info=None):
            log.info("%s %s %s %.1f ms", method, _readable_path(path), status.split()[0],
                     (time.perf_counter() - started) * 1000)
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return logged


def _readable_path(path):
    """A WSGI path (its bytes as Latin-1) for the log: UTF-8 as text, the rest percent-encoded."""
    # The rest: bytes that are not UTF-8, control characters, spaces and %.
    text = path.encode("latin-1").decode("utf-8", "surrogateescape")
    return "".join(
        c if c.isprintable() and c not in " %" else urllib.parse.quote(c.encode("utf-8", "surrogateescape"))
        for c in text
    )


def _bind(host, port):
    """A socket bound to host and port (0: a free one)."""
    # Bound before anything else is set up, so that a port in use fails a
    # start that has created nothing yet.
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _body_limit(options):
    """waitress's body limit: a body up to four times the largest upload reaches the app."""
    # + 1: waitress refuses a body of exactly its limit.
    return BODY_LIMIT_FACTOR * max(options.max_file_bytes, options.max_photo_bytes) + 1


def _create_server(app, sock):
    """A waitress server for `app` on a bound socket, listening, not yet serving."""
    # waitress warns "Task queue depth is N" whenever every thread is busy:
    # normal under load, and the logging costs a quarter of the throughput.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    wsgi = app if app.options.quiet else _with_access_log(app)
    return waitress.server.create_server(
        wsgi,
        sockets=[sock],
        threads=app.options.threads,
        max_request_body_size=_body_limit(app.options),
        max_request_header_size=MAX_HEADER_BYTES,
        outbuf_high_watermark=OUTBUF_HIGH_WATERMARK,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=CHANNEL_TIMEOUT_SECONDS,
        asyncore_use_poll=True,  # select() fails past 1024 open sockets
        ident="messenger",
    )


class _WaitressInternals:
    """Every private part of waitress this module uses: there is no public way to stop it."""

    # setup.py keeps waitress below its next major version, and a test fails,
    # saying what moved, if a release changes any of these.

    def __init__(self, server):
        self.server = server

    def poll(self, timeout):
        """Serve what is ready on the server's sockets, waiting at most `timeout` seconds."""
        waitress.wasyncore.loop(timeout=timeout, use_poll=True, map=self.server._map, count=1)

    def stop_listening(self):
        waitress.wasyncore.dispatcher.close(self.server)  # the listening socket, not the trigger

    def finish_tasks(self):
        """Let the worker threads finish their requests, then end them."""
        self.server.task_dispatcher.shutdown()

    def sending(self):
        """Whether a connection still has an answer to send."""
        return any(getattr(channel, "total_outbufs_len", 0) for channel in list(self.server._map.values()))

    def close_connections(self):
        """Close every connection, and the trigger a worker pulls when it ends a task."""
        for channel in list(self.server._map.values()):
            channel.handle_close()


def _run_server(server, stopping):
    """Serve until `stopping` is set; then finish the requests under way and close every socket."""
    internals = _WaitressInternals(server)
    while not stopping.is_set():
        internals.poll(1.0)
    # Stop listening, let the workers finish while this loop still sends
    # their answers, and only then close the connections and the trigger,
    # here, on the thread that owns them.
    internals.stop_listening()
    workers = threading.Thread(target=internals.finish_tasks)
    workers.start()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and (workers.is_alive() or internals.sending()):
        internals.poll(0.05)
    internals.close_connections()
    workers.join()


def _stop_soon(app, server, stopping):
    """Tell a serving loop to stop: end the waiting polls and wake the loop."""
    stopping.set()
    app.feed.close()
    with contextlib.suppress(OSError):  # the loop already stopped and closed its trigger
        server.pull_trigger()


def _url(host, port):
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server:
    """A messenger server on a background thread; a context manager that stops it."""

    # Server(db=":memory:", port=0, **options) builds its own app with
    # make_app(db, **options); Server(app) serves an app made elsewhere.

    def __init__(self, app=None, *, db=":memory:", host=DEFAULT_HOST, port=0, **options):
        sock = _bind(host, port)
        try:
            self.app = make_app(db, **options) if app is None else app
        except BaseException:
            sock.close()
            raise
        self._owns_app = app is None
        try:
            self._server = _create_server(self.app, sock)
        except BaseException:
            sock.close()
            self._close_app()
            raise
        self.host, self.port = host, int(self._server.effective_port)
        self.url = _url(host, self.port)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=_run_server, args=(self._server, self._stopping), name=f"messenger:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _close_app(self):
        if self._owns_app:
            self.app.db.close()

    def reset(self, fixtures=None):
        """Do what POST /__reset does, without the flag: empty the database and load these fixtures
        (a path or a dict), or the server's own; FixturesError, and nothing changed, if they are wrong."""
        if isinstance(fixtures, (str, os.PathLike)):
            reset(self.app, _read_fixtures(fixtures), os.path.dirname(os.path.abspath(fixtures)))
        else:
            reset(self.app, fixtures, os.getcwd())

    def stop(self):
        """Close every socket, wait for the threads, and close the database if it is ours."""
        if self._stopping.is_set():
            return
        _stop_soon(self.app, self._server, self._stopping)
        self._thread.join()
        self._close_app()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def serve(app, host=DEFAULT_HOST, port=DEFAULT_PORT):
    """Serve `app` with waitress until SIGTERM or Ctrl-C (on the main thread; else forever)."""
    _serve(app, _bind(host, port), host)


def _serve(app, sock, host):
    """Serve `app` on a socket bound to `host` until SIGTERM or Ctrl-C."""
    server = _create_server(app, sock)
    stopping = threading.Event()

    def stop(signum, frame):
        _stop_soon(app, server, stopping)

    if threading.current_thread() is threading.main_thread():  # the only thread that may
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    print(f"messenger {__version__} serving {_url(host, server.effective_port)}/"
          f" with database {app.db.path}", flush=True)
    _run_server(server, stopping)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr, not argparse's usage block."""
        self.exit(2, f"messenger: {message} (see --help)\n")


def _parse_args(argv):
    """The command line's flags: (the server's flags, the app's options given)."""
    parser = _ArgumentParser(
        prog="messenger",
        description="A messenger backend: a JSON API over HTTP on SQLite. Ctrl-C or SIGTERM stops it.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on; 0 picks a free one (default %(default)s)")
    parser.add_argument("--db", default=DEFAULT_DB,
                        help="SQLite file, created on first start; ':memory:' for a throwaway one"
                             " (default %(default)s)")
    for field in dataclasses.fields(Options):
        if field.metadata["help"] is None:
            continue  # not a flag
        flag = dict(field.metadata["flag"])
        if isinstance(field.default, bool):
            flag["action"] = "store_true"
        name = flag.pop("name", "--" + field.name.replace("_", "-"))
        parser.add_argument(name, dest=field.name, help=field.metadata["help"],
                            default=argparse.SUPPRESS, **flag)  # absent: Options has the default
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    options = {field.name: getattr(args, field.name) for field in dataclasses.fields(Options)
               if hasattr(args, field.name)}
    try:
        Options(**options)
    except ValueError as exc:
        parser.error(str(exc))
    return args, options


def _use_one_core():
    """Keep this process on one core, the least taken, where the system allows it (MESSENGER_PIN=0: not)."""
    # waitress's threads contending for Python's lock across two cores served
    # a third as many requests as on one (see README, Performance).
    if not hasattr(os, "sched_setaffinity") or os.environ.get("MESSENGER_PIN") == "0":
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_least_taken_core(cores, _pinned_processes(cores), _busy_ticks(cores))})


def _least_taken_core(cores, pinned, busy):
    """The core with the fewest processes pinned to it (another messenger, say), then the least busy."""
    return min(cores, key=lambda core: (pinned.get(core, 0), busy.get(core, 0), core))


def _pinned_processes(cores):
    """{core: how many other programs are pinned to it alone}, from /proc ({} elsewhere)."""
    pinned = dict.fromkeys(cores, 0)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError), open(os.path.join(entry.path, "cmdline"), "rb") as f:
                    affinity = os.sched_getaffinity(int(entry.name))
                    # The kernel's own threads, one set per core, have no command line.
                    if len(affinity) == 1 and affinity <= pinned.keys() and f.read(1):
                        pinned[min(affinity)] += 1
    return pinned


def _busy_ticks(cores, seconds=0.05):
    """{core: the clock ticks it spent busy over a short look}, from /proc/stat ({} elsewhere)."""
    def sample():
        ticks = {}
        with contextlib.suppress(OSError), open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    values = [int(field) for field in fields]
                    ticks[int(name[3:])] = sum(values) - values[3] - values[4]  # all but idle and iowait
        return ticks
    before = sample()
    time.sleep(seconds)
    after = sample()
    return {core: after[core] - before.get(core, 0) for core in after}


def main(argv=None):
    """The command line: parse the flags, open the database, serve."""
    args, options = _parse_args(argv)
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"messenger: cannot listen on {args.host} port {args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    try:
        app = _open_app(args.db, options)
    except FixturesError as exc:
        sock.close()
        if options.get("demo") and not exc.path:
            print(f"messenger: {args.db} already has users of its own, so --demo adds none and its"
                  " logins would fail; give the demo a database of its own: messenger --demo --db demo.db",
                  file=sys.stderr)
        else:
            print(f"messenger: {options.get('fixtures', '--demo')}: {exc}", file=sys.stderr)
        return 1
    except (sqlite3.Error, OSError) as exc:
        sock.close()
        print(f"messenger: cannot open the database {args.db!r}: {exc}", file=sys.stderr)
        return 1
    if app.options.demo:
        print("demo data added:" if app.demo_seeded else "the demo data is already there:",
              ", ".join(user["email"] for user in app.fixtures[0]["users"]), f"(password: {DEMO_PASSWORD})")
    elif app.fixtures:
        print(("fixtures loaded from " if app.demo_seeded else "the fixtures are already there, from ")
              + app.options.fixtures)
    # Only a start that will serve touches the process: its cores and its logging.
    _use_one_core()
    logging.basicConfig(level=logging.WARNING if app.options.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        _serve(app, sock, args.host)
    finally:
        app.db.close()
    return 0


def _open_app(db, options):
    """make_app for the command line; a database file this start created is removed if it fails."""
    directory = os.path.dirname(os.path.abspath(db))
    if db != ":memory:" and not os.path.isdir(directory):
        raise OSError(f"the directory {directory!r} does not exist")
    new_file = db != ":memory:" and not os.path.exists(db)
    try:
        return make_app(db, **options)
    except BaseException:
        if new_file:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(db + suffix)
        raise


if __name__ == "__main__":
    sys.exit(main())
