"""Tests for messenger, in the order of the API contract (README.md)."""

import base64
import collections
import contextlib
import datetime
import hashlib
import importlib.metadata
import html
import http.server
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import http.client
import urllib.error
import urllib.parse
import urllib.request
import wsgiref.simple_server
import zlib

import pytest
import waitress.channel
import waitress.wasyncore
import webtest

import messenger

# Every answer a test receives through CheckedApp is checked against the
# app's own OpenAPI description, with this checker of the JSON Schema subset
# the description uses.
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(schema, value, doc, where="$"):
    """Where `value` breaks `schema`: a list of complaints, empty when it conforms."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return schema_errors(doc["components"]["schemas"][name], value, doc, where)
    errors = []
    for part in schema.get("allOf", []):
        errors += schema_errors(part, value, doc, where)
    if "oneOf" in schema:
        matching = [part for part in schema["oneOf"] if not schema_errors(part, value, doc, where)]
        if len(matching) != 1:
            errors.append(f"{where}: matches {len(matching)} of oneOf")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(type(value) is int if kind == "integer" else isinstance(value, JSON_TYPES[kind])
                   for kind in types):
            return errors + [f"{where}: {value!r} is not of type {schema['type']}"]
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            errors.append(f"{where}: {len(value)} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if type(value) is int and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{where}: {value} out of range")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{where}: {len(value)} items")
        for n, item in enumerate(value):
            errors += schema_errors(schema.get("items", {}), item, doc, f"{where}[{n}]")
    if isinstance(value, dict):
        errors += [f"{where}: no {key!r}" for key in schema.get("required", []) if key not in value]
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(properties[key], item, doc, f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: {key!r} is not in the description")
            elif isinstance(extra, dict):
                errors += schema_errors(extra, item, doc, f"{where}.{key}")
    return errors


def openapi_of(app):
    """The app's description, made again when routes were added (a test's /crash)."""
    if getattr(app, "checked_routes", None) != len(app.routes):
        app.checked_openapi = messenger.openapi_document(app, "http://localhost")
        app.checked_routes = len(app.routes)
    return app.checked_openapi


def check_answer(app, environ, response):
    """Fail unless the answer is one the app's description gives for its route and status."""
    doc, status = openapi_of(app), response.status_int
    route = environ.get("bottle.route")
    test_route = route is not None and route.rule.startswith("/__")  # not described, but errors are errors
    if route is None or status in (204, 304) or (test_route and status >= 400):  # not routed, or no body
        if response.content_type == "application/json":
            assert not schema_errors(messenger.SCHEMAS["Error"], response.json, doc), response.body
        return
    if test_route:
        return
    answer = doc["paths"][messenger._route_path(route.rule)][route.method.lower()]["responses"].get(
        str(status))
    assert answer, f"{route.method} {route.rule} answered {status}, which its description lacks"
    media = {name.split("/")[0]: name for name in answer["content"]}
    documented = answer["content"].get(response.content_type) or answer["content"].get(
        media.get(response.content_type.split("/")[0], "*/*"))
    assert documented, f"{route.method} {route.rule} answered {response.content_type}, not documented"
    if response.content_type == "application/json":
        errors = schema_errors(documented["schema"], response.json, doc)
        assert not errors, f"{route.method} {route.rule} {status}: {errors}"


class CheckedApp(webtest.TestApp):
    """A WebTest client whose every answer is checked against the app's OpenAPI description."""

    def do_request(self, req, status=None, expect_errors=None):
        response = super().do_request(req, status, expect_errors)
        check_answer(self.app, req.environ, response)
        return response


ITERATIONS = 1000  # the tests lower the password cost through make_app
PASSWORD = "correct horse"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 32
GIF = b"GIF89a" + b"\0" * 32
WEBP = b"RIFF\x24\0\0\0WEBPVP8 " + b"\0" * 32


@pytest.fixture(scope="session")
def empty_database(tmp_path_factory):
    """A new database as make_app creates it, made once: a copy opens in a quarter of the time."""
    path = str(tmp_path_factory.mktemp("template") / "empty.db")
    messenger.make_app(path).db.close()
    return path


@pytest.fixture
def make_app(tmp_path, empty_database):
    """Build apps for a test: each on a new empty database file in tmp_path unless given `db`,
    with the cheap password cost unless told otherwise; every one is closed when the test ends."""
    apps = []

    def make(db=None, **options):
        options.setdefault("password_iterations", ITERATIONS)
        if db is None:
            db = shutil.copy(empty_database, tmp_path / f"app{len(apps)}.db")
        apps.append(messenger.make_app(str(db), **options))
        return apps[-1]

    yield make
    for app in apps:
        app.db.close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def api(app):
    return CheckedApp(app)


def logged_in(app, email, password=PASSWORD, **fields):
    """Register a user on app and return a client logged in as them, with .user set."""
    client = CheckedApp(app)
    client.user = client.post_json("/users", dict(fields, email=email, password=password)).json
    client.post_json("/login", {"email": email, "password": password})
    return client


@pytest.fixture
def login(app):
    """A builder of logged-in clients: login(email=None, password=PASSWORD, **fields)."""
    emails = (f"user{n}@example.com" for n in itertools.count(1))

    def login(email=None, password=PASSWORD, **fields):
        return logged_in(app, email or next(emails), password, **fields)

    return login


@pytest.fixture
def ann(login):
    return login("ann@example.com", name="Ann Lee", username="ann")


@pytest.fixture
def bob(login):
    return login("bob@example.com", username="bob")


@pytest.fixture
def chat(ann, bob):
    return ann.post_json("/chats", {"user_id": bob.user["id"]}).json


def user_json(user_id, email, username, name="", status="", phone=""):
    return {"id": user_id, "email": email, "username": username, "name": name,
            "status": status, "phone": phone}


def send(client, chat_id, text):
    return client.post_json(f"/chats/{chat_id}/messages", {"text": text}).json


def updates(client, **params):
    return client.get("/updates", params=params).json["updates"]


def profile(client, **changes):
    """The whole profile a PUT /users/{id} needs: the client's user, with changes."""
    return dict({key: client.user[key] for key in ("email", "username", "name", "status", "phone")},
                **changes)


def error(response):
    return response.json["error"], response.json.get("field")


def query(app, sql, *params):
    conn = sqlite3.connect(app.db.path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# 1. Conventions
# ---------------------------------------------------------------------------


def test_unknown_route_is_json_404(api):
    response = api.get("/nowhere", status=404)
    assert response.content_type == "application/json"
    assert response.json == {"error": "not_found", "message": "There is no such route."}


def test_wrong_method_is_405_with_allow(api):
    response = api.delete("/chats", status=405)
    assert error(response) == ("method_not_allowed", None)
    assert set(response.headers["Allow"].split(",")) == {"GET", "POST"}


def test_routing_errors_come_before_session_check(api):
    assert error(api.patch("/users", status=405)) == ("method_not_allowed", None)


def test_crash_is_json_500_without_traceback(app, api):
    app.route("/crash", callback=lambda: 1 / 0, contract=messenger.Contract(public=True))
    response = api.get("/crash", status=500, expect_errors=True)
    assert response.json == {"error": "internal_error",
                             "message": "The server failed; the error has been logged."}
    assert "Traceback" not in response.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data", "image/png",
                                          "application/json; charset=latin-1"])
def test_body_is_json_whatever_its_content_type(api, content_type):
    body = json.dumps({"email": "ann@example.com", "password": PASSWORD}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    response = api.request("/users", method="POST", body=body, headers=headers)
    assert response.json["email"] == "ann@example.com"


def test_empty_body_counts_as_empty_object(ann, chat):
    assert ann.post(f"/chats/{chat['id']}/read", "").json == {"unread_count": 0}


def test_unknown_keys_are_ignored(api):
    body = {"email": "ann@example.com", "password": PASSWORD, "admin": True}
    assert "admin" not in api.post_json("/users", body).json


@pytest.mark.parametrize("body", [
    b"{",
    b"[1, 2]",
    b'"text"',
    b"null",
    b"42",
    b"\xff\xfe{}",
    b'{"email": "\xff"}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a": ' * 14_000 + b"1" + b"}" * 14_000,
    b'{"n": 1' + b"0" * 5000 + b"}",
], ids=["truncated", "array", "string", "null", "number", "bad-utf8", "bad-utf8-in-string",
        "deep-array", "deep-object", "huge-number"])
def test_invalid_json_is_400(api, body):
    response = api.post("/login", body, status=400)
    assert error(response) == ("invalid_json", None)


def test_json_body_over_100_kib_is_413(api):
    body = json.dumps({"email": "a@b.c", "password": "x" * 110_000})
    assert error(api.post("/users", body, status=413)) == ("payload_too_large", None)


@pytest.mark.parametrize("path", ["/chats/{}", "/chats/{}/messages", "/photos/{}", "/users/{}"])
@pytest.mark.parametrize("bad_id", ["0", str(2**63), "99999999999999999999"])
def test_path_id_out_of_range_is_invalid_field(ann, path, bad_id):
    assert error(ann.get(path.format(bad_id), status=400)) == ("invalid_field", "id")


@pytest.mark.parametrize("path", ["/chats/{}", "/chats/{}/messages", "/photos/{}"])
@pytest.mark.parametrize("bad_id", ["-1", "abc", "１２", "1.5"])
def test_path_id_not_digits_is_invalid_field(ann, path, bad_id):
    url = path.format(urllib.parse.quote(bad_id))
    assert error(ann.get(url, status=400)) == ("invalid_field", "id")


@pytest.mark.parametrize("path", ["/users", "/users/1", "/users/ann", "/photos/1", "/chats",
                                  "/chats/1", "/chats/1/messages"])
def test_routes_need_a_session(api, path):
    assert error(api.get(path, status=401)) == ("not_authorized", None)


@pytest.mark.parametrize("method, path", [("DELETE", "/logout"), ("PUT", "/users/1"),
                                          ("POST", "/photos"), ("DELETE", "/photos"),
                                          ("POST", "/chats"), ("POST", "/chats/1/messages"),
                                          ("POST", "/chats/1/read")])
def test_writes_need_a_session(api, method, path):
    response = api.request(path, method=method, body=b"{}", status=401)
    assert error(response) == ("not_authorized", None)


def test_time_stamps_are_iso_utc_with_milliseconds(ann, chat):
    message = send(ann, chat["id"], "hello")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", message["created_at"])


def test_json_is_utf8_text_in_every_response(ann, chat):
    ann.put_json(f"/users/{ann.user['id']}", profile(ann, name="Иван 👋"))
    message = ann.post_json(f"/chats/{chat['id']}/messages", {"text": "Привет 👋"})
    history = ann.get(f"/chats/{chat['id']}/messages")
    assert "Иван 👋".encode() in ann.get("/users").body
    assert "Привет 👋".encode() in message.body and b"\\u" not in message.body + history.body


def test_message_bytes_do_not_depend_on_the_route(ann, bob, chat):
    sent = ann.post_json(f"/chats/{chat['id']}/messages", {"text": 'tab\t"quote" \\ 👋'}).body
    assert sent in ann.get(f"/chats/{chat['id']}/messages").body
    assert sent in ann.get(f"/chats/{chat['id']}").body
    assert sent in bob.get("/updates").body


# ---------------------------------------------------------------------------
# 2. Sessions
# ---------------------------------------------------------------------------


def login_cookie(client, email, password=PASSWORD):
    response = client.post_json("/login", {"email": email, "password": password})
    return response.headers["Set-Cookie"]


def test_login_sets_session_cookie(api, ann):
    cookie = login_cookie(api, "ann@example.com")
    assert re.match(r"session_id=[A-Za-z0-9_-]{43};", cookie)
    flags = {flag.strip().lower() for flag in cookie.split(";")[1:]}
    assert flags == {"httponly", "max-age=2592000", "path=/", "samesite=lax"}


def test_login_cookie_is_secure_with_secure_cookies(make_app):
    api = CheckedApp(make_app(secure_cookies=True))
    api.post_json("/users", {"email": "ann@example.com", "password": PASSWORD})
    assert "secure" in login_cookie(api, "ann@example.com").lower()


def test_session_stores_only_token_digest(app, api, ann):
    token = login_cookie(api, "ann@example.com").split(";")[0].split("=", 1)[1]
    stored = [row[0] for row in query(app, "SELECT token_hash FROM sessions")]
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert token not in stored


def test_session_lifetime_is_configurable(make_app):
    api = CheckedApp(make_app(session_days=2))
    api.post_json("/users", {"email": "ann@example.com", "password": PASSWORD})
    assert "Max-Age=172800" in login_cookie(api, "ann@example.com")


def test_expired_session_is_401(app, ann):
    # the server enforces expiry, not only the cookie's Max-Age
    with app.db.transaction() as conn:
        conn.execute("UPDATE sessions SET expires_at = 1")
    assert error(ann.get("/users", status=401)) == ("not_authorized", None)


def test_each_login_is_a_new_session(app, api, ann):
    login_cookie(api, "ann@example.com")
    assert api.get("/users").json["id"] == ann.get("/users").json["id"]
    assert len(query(app, "SELECT * FROM sessions")) == 2


def test_logout_deletes_session_and_expires_cookie(app, ann):
    response = ann.delete("/logout")
    assert response.json == {}
    assert response.headers["Set-Cookie"].lower().startswith('session_id=""; expires=thu, 01 jan 1970')
    assert query(app, "SELECT * FROM sessions") == []


@pytest.mark.parametrize("header", [
    "session_id=nonsense",
    "session_id=",
    "session_id",
    'session_id="\\x00\\xff"',
    "=; ;;; a=b=c",
    "session_id=" + "a" * 10_000,
])
def test_malformed_session_cookie_is_401(api, header):
    assert error(api.get("/users", headers={"Cookie": header}, status=401)) == \
        ("not_authorized", None)


def test_malformed_pair_does_not_hide_session_cookie(api, ann):
    token = login_cookie(api, "ann@example.com").split(";")[0]
    fresh = CheckedApp(api.app)
    assert fresh.get("/users", headers={"Cookie": f'x="bad; {token}; y'}).json["id"] == ann.user["id"]


def test_two_session_cookies_either_order(api, ann):
    token = login_cookie(api, "ann@example.com").split(";")[0]
    fresh = CheckedApp(api.app)
    for header in (f"session_id=stale; {token}", f"{token}; session_id=stale"):
        assert fresh.get("/users", headers={"Cookie": header}).json["id"] == ann.user["id"]


def test_password_change_ends_other_sessions(api, ann):
    login_cookie(api, "ann@example.com")
    profile = dict(ann.user, password="a new password")
    ann.put_json(f"/users/{ann.user['id']}", profile)
    assert ann.get("/users").json["id"] == ann.user["id"]
    assert error(api.get("/users", status=401)) == ("not_authorized", None)


def fail_login(api, email):
    return api.post_json("/login", {"email": email, "password": "wrong password"}, status="*")


def test_login_throttled_after_ten_failures(api, ann):
    for _ in range(10):
        assert error(fail_login(api, "ann@example.com")) == ("wrong_credentials", None)
    response = api.post_json("/login", {"email": "ANN@example.com", "password": PASSWORD}, status=429)
    assert error(response) == ("too_many_attempts", None)
    assert 1 <= int(response.headers["Retry-After"]) <= 15 * 60


def test_login_throttle_window_passes(app, api, ann):
    for _ in range(10):
        fail_login(api, "ann@example.com")
    with app.db.transaction() as conn:
        conn.execute("UPDATE login_failures SET failed_at = failed_at - 15 * 60")
    assert api.post_json("/login", {"email": "ann@example.com", "password": PASSWORD}).status_int == 200


def test_login_success_clears_failures(api, ann):
    for _ in range(9):
        fail_login(api, "ann@example.com")
    login_cookie(api, "ann@example.com")
    for _ in range(9):
        fail_login(api, "ann@example.com")
    assert api.post_json("/login", {"email": "ann@example.com", "password": PASSWORD}).status_int == 200


def test_login_throttle_is_per_email(api, ann, bob):
    for _ in range(10):
        fail_login(api, "ann@example.com")
    assert api.post_json("/login", {"email": "bob@example.com", "password": PASSWORD}).status_int == 200


# ---------------------------------------------------------------------------
# 3. Users
# ---------------------------------------------------------------------------


def test_register_returns_the_user_without_cookie(api):
    response = api.post_json("/users", {"email": "ann@example.com", "password": PASSWORD,
                                        "name": "Ann Lee", "status": "hi", "phone": "+1 (555) 0-1"})
    assert response.json == user_json(1, "ann@example.com", "ann", "Ann Lee", "hi", "+1 (555) 0-1")
    assert "Set-Cookie" not in response.headers


def test_sign_up_registers_too(api):
    response = api.post_json("/sign_up", {"email": "ann@example.com", "password": PASSWORD})
    assert response.json == user_json(1, "ann@example.com", "ann")


def test_register_null_optional_fields_are_empty(api):
    body = {"email": "ann@example.com", "password": PASSWORD, "username": None, "name": None,
            "status": None, "phone": None}
    assert api.post_json("/users", body).json == user_json(1, "ann@example.com", "ann")


@pytest.mark.parametrize("body, field", [
    ({"password": PASSWORD}, "email"),
    ({"email": None, "password": PASSWORD}, "email"),
    ({"email": "ann@example.com"}, "password"),
    ({"email": "ann@example.com", "password": None}, "password"),
])
def test_register_missing_field(api, body, field):
    assert error(api.post_json("/users", body, status=400)) == ("missing_field", field)


@pytest.mark.parametrize("field, value", [
    ("email", 42),
    ("email", ["a@b.c"]),
    ("email", "ab"),
    ("email", "a" * 250 + "@b.cd"),
    ("email", "no-at-sign"),
    ("email", "two@at@signs"),
    ("email", "@example.com"),
    ("email", "ann@"),
    ("email", "ann smith@example.com"),
    ("email", "ann@exa\u00a0mple.com"),
    ("email", "ann\x01@example.com"),
    ("email", "ann\0@example.com"),
    ("email", "\ud800@example.com"),
    ("password", "short"),
    ("password", "x" * 1025),
    ("password", 12345678),
    ("password", "pass\0word"),
    ("password", "pass\udfffword"),
    ("username", ""),
    ("username", "a" * 33),
    ("username", "12345"),
    ("username", "ann smith"),
    ("username", "ann-smith"),
    ("username", "ann@home"),
    ("username", "ann\x7f"),
    ("username", True),
    ("name", "n" * 129),
    ("name", "Ann\x00"),
    ("name", "Ann\nLee"),
    ("name", "\ud800"),
    ("name", 5),
    ("status", "s" * 257),
    ("status", "tab\there"),
    ("phone", "p" * 33),
    ("phone", "555-CALL"),
    ("phone", "１２３"),
    ("phone", {"n": 1}),
])
def test_register_invalid_field(api, field, value):
    body = {"email": "ann@example.com", "password": PASSWORD, field: value}
    assert error(api.post_json("/users", body, status=400)) == ("invalid_field", field)


@pytest.mark.parametrize("field, value", [
    ("email", "a@b"),
    ("email", "a" * 64 + "@" + "b" * 189),
    ("username", "Ёж_2.0"),
    ("username", "a" * 32),
    ("username", "李雷"),
    ("name", "n" * 128),
    ("status", "s" * 256),
    ("phone", "+7 (900) 123-45-67"),
])
def test_register_accepts_field_at_its_limits(api, field, value):
    body = {"email": "ann@example.com", "password": PASSWORD, field: value}
    assert api.post_json("/users", body).json[field] == value


@pytest.mark.parametrize("password", ["x" * 8, "x" * 1024, "tab\tand\x01control"])
def test_register_accepts_password_at_its_limits(api, password):
    user = api.post_json("/users", {"email": "ann@example.com", "password": password}).json
    assert api.post_json("/login", {"email": "ann@example.com", "password": password}).json == user


def test_register_email_taken_case_insensitively(api):
    api.post_json("/users", {"email": "ann@example.com", "password": PASSWORD})
    response = api.post_json("/users", {"email": "ANN@Example.com", "password": PASSWORD}, status=400)
    assert error(response) == ("email_taken", "email")


def test_register_username_taken_with_unicode_case_folding(api):
    api.post_json("/users", {"email": "a@example.com", "password": PASSWORD, "username": "Ёж"})
    body = {"email": "b@example.com", "password": PASSWORD, "username": "ёЖ"}
    assert error(api.post_json("/users", body, status=400)) == ("username_taken", "username")


def test_register_username_is_compared_after_nfc(api):
    composed = api.post_json("/users", {"email": "a@example.com", "password": PASSWORD,
                                        "username": "й"}).json
    body = {"email": "b@example.com", "password": PASSWORD, "username": "И\u0306"}
    assert composed["username"] == "\u0439"
    assert error(api.post_json("/users", body, status=400)) == ("username_taken", "username")


def test_register_decomposed_username_is_stored_composed(api):
    body = {"email": "a@example.com", "password": PASSWORD, "username": "и\u0306ога"}
    assert api.post_json("/users", body).json["username"] == "йога"


def test_login_email_is_compared_after_nfc(api):
    api.post_json("/users", {"email": "йо@example.com", "password": PASSWORD})
    body = {"email": "И\u0306О@example.com", "password": PASSWORD}
    assert api.post_json("/login", body).json["email"] == "йо@example.com"


def test_register_yo_and_ye_usernames_are_different(api):
    api.post_json("/users", {"email": "a@example.com", "password": PASSWORD, "username": "ёжик"})
    body = {"email": "b@example.com", "password": PASSWORD, "username": "ежик"}
    assert api.post_json("/users", body).json["username"] == "ежик"


@pytest.mark.parametrize("email, username", [
    ("john.doe+news@example.com", "john.doenews"),
    ("Ёжик@example.com", "Ёжик"),
    ("12345@example.com", "user12345"),
    ("+-+@example.com", "user"),
    ("a" * 40 + "@example.com", "a" * 28),
])
def test_register_makes_username_from_email(api, email, username):
    assert api.post_json("/users", {"email": email, "password": PASSWORD}).json["username"] == username


def test_register_and_login_trim_white_space_around_the_email(api):
    user = api.post_json("/users", {"email": " ann@example.com\u00a0", "password": PASSWORD}).json
    api.post_json("/login", {"email": "ann@example.com ", "password": PASSWORD})
    assert (user["email"], api.get("/users").json["id"]) == ("ann@example.com", user["id"])


INVISIBLE = ["\u200b", "\u200d", "\u200e", "\ufeff", "\u0301", " \u200b\u2060 ", "\u3000\u200c"]


@pytest.mark.parametrize("text", INVISIBLE)
def test_send_invisible_text_is_invalid(ann, chat, text):
    response = ann.post_json(f"/chats/{chat['id']}/messages", {"text": text}, status=400)
    assert error(response) == ("invalid_field", "text")


@pytest.mark.parametrize("name", [*INVISIBLE, "\u202egnp.exe", "a\u2066b", "a\u2069"])
def test_group_name_invisible_or_with_bidi_overrides_is_invalid(ann, name):
    assert error(ann.post_json("/chats", {"name": name}, status=400)) == ("invalid_field", "name")


@pytest.mark.parametrize("field", ["name", "status"])
@pytest.mark.parametrize("value", ["\u202eAnn", "Ann\u202a", "\u2067x\u2069"])
def test_profile_bidi_overrides_are_invalid(api, field, value):
    response = api.post_json("/users", {"email": "a@b.c", "password": PASSWORD, field: value}, status=400)
    assert error(response) == ("invalid_field", field)


def test_text_with_a_visible_character_and_marks_is_accepted(ann, chat):
    assert send(ann, chat["id"], "\u200bé\u0301")["text"] == "\u200bé\u0301"


def test_register_numbers_a_taken_username(api):
    api.post_json("/users", {"email": "ann@one.com", "password": PASSWORD})
    api.post_json("/users", {"email": "x@one.com", "password": PASSWORD, "username": "ANN3"})
    usernames = [api.post_json("/users", {"email": f"ann@{n}.com", "password": PASSWORD}).json["username"]
                 for n in ("two", "three")]
    assert usernames == ["ann2", "ann4"]


def test_password_is_hashed_with_pbkdf2_and_salt(app, api):
    api.post_json("/users", {"email": "a@example.com", "password": PASSWORD})
    api.post_json("/users", {"email": "b@example.com", "password": PASSWORD})
    hashes = [row[0] for row in query(app, "SELECT password_hash FROM users")]
    for stored in hashes:
        assert re.fullmatch(r"pbkdf2_sha256\$1000\$[0-9a-f]{32}\$[0-9a-f]{64}", stored)
    assert hashes[0] != hashes[1]


def test_password_default_cost_is_600000_iterations():
    assert messenger.hash_password("x").startswith("pbkdf2_sha256$600000$")


def test_password_never_in_any_response(app, ann, bob, chat):
    stored = query(app, "SELECT password_hash FROM users")[0][0]
    for path in ("/users", "/users/1", "/users/a", "/chats", f"/chats/{chat['id']}"):
        text = ann.get(path).text
        assert "password" not in text and stored.split("$")[3] not in text


def test_login_returns_the_user(api, ann):
    response = api.post_json("/login", {"email": "ann@example.com", "password": PASSWORD})
    assert response.json == user_json(ann.user["id"], "ann@example.com", "ann", "Ann Lee")


def test_login_email_is_case_insensitive(api, ann):
    assert api.post_json("/login", {"email": "Ann@EXAMPLE.com", "password": PASSWORD}).json == ann.user


@pytest.mark.parametrize("body, field", [({"password": PASSWORD}, "email"),
                                         ({"email": "ann@example.com"}, "password")])
def test_login_missing_field(api, body, field):
    assert error(api.post_json("/login", body, status=400)) == ("missing_field", field)


def test_login_unknown_email_and_wrong_password_look_the_same(api, ann):
    wrong = api.post_json("/login", {"email": "ann@example.com", "password": "not it!!"}, status=400)
    unknown = api.post_json("/login", {"email": "who@example.com", "password": "not it!!"}, status=400)
    assert wrong.json == unknown.json == {"error": "wrong_credentials",
                                          "message": "The email or the password is wrong."}


def test_login_unknown_email_costs_one_hash_like_wrong_password(api, ann, monkeypatch):
    calls = []
    real = messenger.hashlib.pbkdf2_hmac
    monkeypatch.setattr(messenger.hashlib, "pbkdf2_hmac",
                        lambda *args: calls.append(args[3]) or real(*args))
    api.post_json("/login", {"email": "ann@example.com", "password": "not it!!"}, status=400)
    api.post_json("/login", {"email": "who@example.com", "password": "not it!!"}, status=400)
    assert calls == [ITERATIONS, ITERATIONS]


def test_login_rehashes_a_cheaper_password(make_app, tmp_path):
    path = str(tmp_path / "rehash.db")
    cheap = make_app(path)
    CheckedApp(cheap).post_json("/users", {"email": "ann@example.com", "password": PASSWORD})
    cheap.db.close()
    dearer = make_app(path, password_iterations=ITERATIONS * 2)
    CheckedApp(dearer).post_json("/login", {"email": "ann@example.com", "password": PASSWORD})
    stored = query(dearer, "SELECT password_hash FROM users")[0][0]
    assert stored.startswith(f"pbkdf2_sha256${ITERATIONS * 2}$")
    assert messenger.verify_password(PASSWORD, stored)


def test_current_user(ann):
    assert ann.get("/users").json == user_json(ann.user["id"], "ann@example.com", "ann", "Ann Lee")


def test_get_user_by_id(ann, bob):
    assert ann.get(f"/users/{bob.user['id']}").json == user_json(bob.user["id"], "", "bob")


def test_get_user_unknown_id(ann):
    assert error(ann.get("/users/999", status=400)) == ("user_not_found", None)


def contacts(client, other):
    """The email and phone `client` sees of `other`, by id and by search."""
    by_id = client.get(f"/users/{other.user['id']}").json
    found = client.get("/users/" + other.user["username"]).json["users"][0]
    assert (found["email"], found["phone"]) == (by_id["email"], by_id["phone"])
    return by_id["email"], by_id["phone"]


@pytest.fixture
def dan(login):
    return login("dan@example.com", username="dan", phone="+1 555 0100")


def test_contacts_hidden_from_a_stranger(ann, dan):
    assert contacts(ann, dan) == ("", "")


def test_contacts_hidden_when_only_a_dialog_is_opened(ann, dan):
    ann.post_json("/chats", {"user_id": dan.user["id"]})
    dan.post_json("/chats", {"user_id": ann.user["id"]})
    assert contacts(ann, dan) == ("", "")


def test_contacts_shown_to_whom_one_has_written(ann, dan):
    chat = dan.post_json("/chats", {"user_id": ann.user["id"]}).json
    send(dan, chat["id"], "Hi Ann")
    assert (contacts(ann, dan), contacts(dan, ann)) == (("dan@example.com", "+1 555 0100"), ("", ""))


def test_contacts_hidden_from_group_members_until_they_write(ann, bob, dan):
    group = make_group(ann, "Trip", bob, dan)
    assert contacts(bob, dan) == ("", "")
    send(dan, group["id"], "Hello all")
    assert contacts(bob, dan) == ("dan@example.com", "+1 555 0100")


def test_contacts_hidden_again_when_the_message_is_deleted(ann, dan):
    chat = dan.post_json("/chats", {"user_id": ann.user["id"]}).json
    message = send(dan, chat["id"], "Hi Ann")
    dan.delete(f"/chats/{chat['id']}/messages/{message['id']}")
    assert contacts(ann, dan) == ("", "")


def test_contacts_hidden_again_when_one_leaves(ann, bob, dan):
    group = make_group(ann, "Trip", bob, dan)
    send(dan, group["id"], "Hello all")
    bob.delete(f"/chats/{group['id']}/members/{bob.user['id']}")
    assert contacts(bob, dan) == ("", "")


def test_contacts_of_a_rejoining_member_count_their_messages(ann, bob, dan):
    group = make_group(ann, "Trip", bob, dan)
    send(dan, group["id"], "Hello all")
    dan.delete(f"/chats/{group['id']}/members/{dan.user['id']}")
    ann.post_json(f"/chats/{group['id']}/members", {"user_id": dan.user["id"]})
    assert contacts(bob, dan) == ("dan@example.com", "+1 555 0100")


def test_walking_ids_shows_no_contacts(ann, login):
    users = [login(phone="123") for _ in range(3)]
    walked = [ann.get(f"/users/{user.user['id']}").json for user in users]
    assert {(user["email"], user["phone"]) for user in walked} == {("", "")}


def search(client, text, **params):
    response = client.get("/users/" + urllib.request.quote(text), params=params)
    return [user["username"] for user in response.json["users"]]


def test_search_finds_usernames_containing_the_text(login):
    client = login(username="zed")
    for username in ("xannx", "Anna", "bob", "ann"):
        login(username=username)
    assert search(client, "ANN") == ["ann", "Anna", "xannx"]


def test_search_orders_exact_then_prefix_then_rest(login):
    client = login(username="zed")
    for username in ("b_al", "al", "zal", "alb", "aal", "Al_b"):
        login(username=username)
    assert search(client, "al") == ["al", "Al_b", "alb", "aal", "b_al", "zal"]


def test_search_finds_a_word_of_the_name(login):
    client = login(username="zed")
    login(username="boris", name="Борис Петров")
    login(username="petr", name="Пётр")
    assert (search(client, "Борис"), search(client, "петр")) == (["boris"], ["boris", "petr"])


def test_search_orders_username_then_name_then_the_rest(login):
    client = login(username="zed")
    for username, name in (("xalx", ""), ("bob", "Al Bundy"), ("al2", ""), ("al", ""), ("ann", "Alice")):
        login(username=username, name=name)
    assert search(client, "al") == ["al", "al2", "ann", "bob", "xalx"]


def test_search_name_words_start_with_the_text(login):
    client = login(username="zed")
    login(username="bob", name="Malory")
    assert search(client, "alo") == []


def test_search_folds_unicode_case(login):
    client = login(username="zed")
    login(username="ЁЖИК")
    assert search(client, "ёжик") == ["ЁЖИК"]


@pytest.mark.parametrize("text, found", [("петр", ["пётр", "Петр_2"]), ("пётр", ["пётр", "Петр_2"]),
                                         ("ЕЖ", ["Ёжик"]), ("жик", ["Ёжик"])])
def test_search_reads_yo_as_ye(login, text, found):
    client = login(username="zed")
    for username in ("Ёжик", "пётр", "Петр_2", "иван"):
        login(username=username)
    assert search(client, text) == found


@pytest.mark.parametrize("text", ["%", "_", "\\", "a%", "'; DROP TABLE users; --"])
def test_search_takes_wildcards_literally(login, text):
    client = login(username="plain")
    login(username="has_under")
    expected = ["has_under"] if text == "_" else []
    assert search(client, text) == expected


SEARCH_NAMES = ["", "Анна Петрова", "Ann-Marie", "Ёжик в тумане", "Joe User", "", "Straße 5", "a b"]
SEARCH_USERNAMES = ["ann", "Anna", "xannx", "joanna", "ЁЖИК", "ёжик_2", "ежик3", "Пётр", "петр2",
                    "ПЁТР_ПЕТРОВ", "a_b", "a.b", "ab_c", "ANNA.B", "straße", "user100", "user1000",
                    "quote_me"]


@pytest.fixture(scope="module")
def many_users(tmp_path_factory):
    """An app with the SEARCH_USERNAMES, and enough user<n> names that 'user' has more
    matches than are sorted: (app, every username)."""
    usernames = SEARCH_USERNAMES + [f"user{n:05}" for n in range(messenger.SORTED_SEARCH_MATCHES + 100)]
    names = {username: SEARCH_NAMES[n % len(SEARCH_NAMES)] for n, username in enumerate(usernames)}
    app = messenger.make_app(str(tmp_path_factory.mktemp("search") / "search.db"))
    with app.db.transaction() as conn:
        for n, username in enumerate(usernames):
            messenger._insert_user(conn, f"{n}@example.com", username, "x", names[username])
    yield app, usernames, names


def test_search_index_is_built_where_sqlite_has_fts5(app):
    assert app.db.search_index  # Python's own SQLite builds have FTS5


@pytest.mark.parametrize("query", ["ann", "ANN", "anna", "nna", "ёжи", "ЕЖИ", "ЁЖИК_2", "петр",
                                   "пётр", "ПЁТР_", "a_b", "_b_", "b_c", ".b", "ss", "strasse",
                                   "STRASSE", "user100", "ser10", "user", "ser", "er1", "1", "zzz",
                                   '"qu', "e_me", "%", "an", "a"])
@pytest.mark.parametrize("limit, offset", [(50, 0), (7, 3), (100, 1050)])
@pytest.mark.parametrize("use_index", [True, False], ids=["index", "scan"])
def test_find_users_matches_a_reference(many_users, query, limit, offset, use_index):
    app, usernames, names = many_users
    # The contract, in Python: casefolded, ё read as е; the exact username,
    # then usernames starting with it, then names with a word starting with
    # it, then usernames containing it, each by search key (then by
    # casefolded username). Words: runs of letters, digits and marks.
    def fold(text):
        return text.casefold().replace("ё", "е")

    def words(text):
        return "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in fold(text)).split()

    def group(username):
        search_key = fold(username)
        if search_key == key:
            return 0
        if search_key.startswith(key):
            return 1
        if any(word.startswith(key) for word in words(names[username])):
            return 2
        return 3 if key in search_key else None

    key = fold(query)
    reference = [username.casefold() for username in sorted(
        (username for username in usernames if group(username) is not None),
        key=lambda username: (group(username), fold(username), username.casefold()))]
    with app.db.connection() as conn:
        found = [row["username_key"] for row in
                 messenger.find_users(conn, messenger._search_fold(query), limit, offset, use_index)]
    assert found == reference[offset:offset + limit]


def test_search_index_follows_username_changes(ann, login):
    client = login(username="zed")
    ann.put_json(f"/users/{ann.user['id']}", profile(ann, username="marigold", name=""))
    assert (search(client, "ann"), search(client, "rigo")) == ([], ["marigold"])


def test_search_pages_with_limit_and_offset(login):
    client = login(username="zed")
    for n in range(5):
        login(username=f"u{n}x")
    assert search(client, "x", limit=2, offset=1) == ["u1x", "u2x"]


@pytest.mark.parametrize("params, field", [({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                                           ({"limit": "x"}, "limit"), ({"offset": -1}, "offset")])
def test_search_bad_page_is_invalid_field(ann, params, field):
    assert error(ann.get("/users/a", params=params, status=400)) == ("invalid_field", field)


@pytest.mark.parametrize("text", ["a" * 65, "a" * 10_000, "a\x01b"])
def test_search_bad_query_is_invalid_field(ann, text):
    assert error(ann.get("/users/" + text, status=400)) == ("invalid_field", "query")


def test_edit_user_replaces_the_profile(ann):
    body = {"id": ann.user["id"], "email": "ann@new.org", "username": "annie", "name": "Ann",
            "status": "busy", "phone": "123"}
    assert ann.put_json(f"/users/{ann.user['id']}", body).json == dict(body)
    assert ann.get("/users").json == body


def test_edit_user_null_optional_fields_are_empty(ann):
    body = profile(ann, name=None, status=None, phone=None)
    assert ann.put_json(f"/users/{ann.user['id']}", body).json["name"] == ""


def test_edit_user_keeps_own_email_and_username(ann):
    body = profile(ann, email="ANN@example.com", username="Ann")
    assert ann.put_json(f"/users/{ann.user['id']}", body).json == dict(ann.user, **body)


@pytest.mark.parametrize("field", ["email", "username", "name", "status", "phone"])
def test_edit_user_missing_field(ann, field):
    body = profile(ann)
    del body[field]
    assert error(ann.put_json(f"/users/{ann.user['id']}", body, status=400)) == ("missing_field", field)


@pytest.mark.parametrize("field, value", [("email", "bad"), ("username", ""), ("username", "42"),
                                          ("phone", "x"), ("password", "short"), ("id", 999),
                                          ("id", "1")])
def test_edit_user_invalid_field(ann, field, value):
    body = profile(ann, **{field: value})
    assert error(ann.put_json(f"/users/{ann.user['id']}", body, status=400)) == ("invalid_field", field)


@pytest.mark.parametrize("field, value, mnemonic", [("email", "BOB@example.com", "email_taken"),
                                                    ("username", "BOB", "username_taken")])
def test_edit_user_taken(ann, bob, field, value, mnemonic):
    body = profile(ann, **{field: value})
    assert error(ann.put_json(f"/users/{ann.user['id']}", body, status=400)) == (mnemonic, field)


def test_edit_user_someone_else_is_forbidden(ann, bob):
    response = ann.put_json(f"/users/{bob.user['id']}", profile(bob, name="Hacked"), status=403)
    assert error(response) == ("forbidden", None)
    assert bob.get("/users").json["name"] == ""


def test_edit_user_unknown_id(ann):
    assert error(ann.put_json("/users/999", profile(ann), status=400)) == ("user_not_found", None)


def test_edit_user_changes_password(api, ann):
    assert ann.put_json(f"/users/{ann.user['id']}", profile(ann, password="a new password")).json == ann.user
    old = api.post_json("/login", {"email": "ann@example.com", "password": PASSWORD}, status=400)
    new = api.post_json("/login", {"email": "ann@example.com", "password": "a new password"})
    assert (error(old), new.json) == (("wrong_credentials", None), ann.user)


# ---------------------------------------------------------------------------
# 4. Avatars
# ---------------------------------------------------------------------------


def upload(client, data, name="photo", filename="me.png", status=200):
    return client.post("/photos", upload_files=[(name, filename, data)], status=status)


@pytest.mark.parametrize("data, content_type", [(PNG, "image/png"), (JPEG, "image/jpeg"),
                                                (GIF, "image/gif"), (WEBP, "image/webp")])
def test_upload_photo_then_get_it(ann, data, content_type):
    assert upload(ann, data, filename="x.txt").json == {"url": f"/photos/{ann.user['id']}"}
    response = ann.get(f"/photos/{ann.user['id']}")
    assert (response.body, response.content_type) == (data, content_type)


def test_upload_photo_any_field_name(ann):
    assert upload(ann, PNG, name="whatever").json == {"url": f"/photos/{ann.user['id']}"}
    assert ann.get(f"/photos/{ann.user['id']}").body == PNG


def test_photo_has_safety_headers(ann):
    upload(ann, PNG)
    headers = ann.get(f"/photos/{ann.user['id']}").headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in headers["Content-Security-Policy"]


def test_photo_etag_gives_304(ann):
    upload(ann, PNG)
    etag = ann.get(f"/photos/{ann.user['id']}").headers["ETag"]
    response = ann.get(f"/photos/{ann.user['id']}", headers={"If-None-Match": etag}, status=304)
    assert response.body == b"" and response.headers["ETag"] == etag


def test_new_upload_changes_etag(ann):
    upload(ann, PNG)
    first = ann.get(f"/photos/{ann.user['id']}").headers["ETag"]
    upload(ann, JPEG)
    assert ann.get(f"/photos/{ann.user['id']}", headers={"If-None-Match": first}).headers["ETag"] != first


def test_default_avatar_is_svg_with_initials(ann, bob):
    response = bob.get(f"/photos/{ann.user['id']}")
    assert response.content_type == "image/svg+xml"
    assert ">AL</text>" in response.text and "ETag" in response.headers


def test_default_avatar_uses_username_without_name(ann, bob):
    assert ">B</text>" in ann.get(f"/photos/{bob.user['id']}").text


def test_default_avatar_escapes_user_text(login):
    client = login(name="<script> &amp")
    text = client.get(f"/photos/{client.user['id']}").text
    assert ">&lt;&amp;</text>" in text and "<script" not in text


def test_default_avatar_colour_depends_on_id(ann, bob):
    colour = re.compile(r'fill="(hsl[^"]+)"')
    assert colour.search(ann.get("/photos/1").text)[1] != colour.search(ann.get("/photos/2").text)[1]


def test_delete_photo_restores_default(ann):
    upload(ann, PNG)
    assert ann.delete("/photos").json == {}
    assert ann.get(f"/photos/{ann.user['id']}").content_type == "image/svg+xml"


def test_get_photo_unknown_user(ann):
    assert error(ann.get("/photos/999", status=400)) == ("user_not_found", None)


@pytest.mark.parametrize("data", [b"", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                  b"<html><script>alert(1)</script></html>", b"GIF8", b"RIFF1234WAVE"])
def test_upload_photo_not_an_image(ann, data):
    assert error(upload(ann, data, filename="a.png", status=400)) == ("invalid_image", "photo")


def test_upload_photo_without_file_part(ann):
    response = ann.post("/photos", {"photo": "just text"}, status=400)
    assert error(response) == ("missing_field", "photo")


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data; boundary=xyz", b"garbage"),
    ("multipart/form-data", b"--xyz\r\n\r\n"),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Type: image/png\r\n\r\n" + PNG),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nno colon here\r\n\r\nx\r\n--xyz--\r\n"),
    ("application/json", b'{"photo": "x"}'),
])
def test_upload_photo_malformed_body(ann, content_type, body):
    response = ann.request("/photos", method="POST", body=body, content_type=content_type, status=400)
    assert error(response) == ("missing_field", "photo")


def test_upload_photo_too_large(make_app):
    client = logged_in(make_app(max_photo_bytes=1000), "ann@example.com")
    upload(client, PNG + b"\0" * (1000 - len(PNG)))
    response = upload(client, PNG + b"\0" * (1001 - len(PNG)), status=413)
    assert error(response) == ("payload_too_large", None)
    response = upload(client, PNG + b"\0" * 100_000, status=413)
    assert error(response) == ("payload_too_large", None)


# ---------------------------------------------------------------------------
# 5. Chats and messages
# ---------------------------------------------------------------------------


def test_create_chat_returns_the_chat(ann, bob, chat):
    assert chat == {"id": chat["id"], "type": "dialog", "name": "bob",
                    "members": [ann.user["id"], bob.user["id"]], "owner_id": None,
                    "last_message": None, "unread_count": 0, "last_read_id": 0, "others_read_id": 0,
                    "created_at": chat["created_at"]}


def test_chat_name_is_the_other_members_name(bob, chat):
    assert bob.get(f"/chats/{chat['id']}").json["name"] == "Ann Lee"


def test_create_chat_is_idempotent_from_both_sides(ann, bob, chat):
    assert ann.post_json("/chats", {"user_id": bob.user["id"]}).json["id"] == chat["id"]
    assert bob.post_json("/chats", {"user_id": ann.user["id"]}).json["id"] == chat["id"]


@pytest.mark.parametrize("body, mnemonic", [
    ({}, "missing_field"),
    ({"user_id": None}, "missing_field"),
    ({"user_id": "2"}, "invalid_field"),
    ({"user_id": True}, "invalid_field"),
    ({"user_id": 2.0}, "invalid_field"),
    ({"user_id": 0}, "invalid_field"),
    ({"user_id": -2}, "invalid_field"),
    ({"user_id": 2**63}, "invalid_field"),
    ({"user_id": 1}, "invalid_field"),
])
def test_create_chat_bad_user_id(ann, bob, body, mnemonic):
    assert error(ann.post_json("/chats", body, status=400)) == (mnemonic, "user_id")


def test_create_chat_unknown_user(ann):
    assert error(ann.post_json("/chats", {"user_id": 999}, status=400)) == ("user_not_found", "user_id")


def test_list_chats_most_recent_activity_first(login, ann, bob):
    carl = login(username="carl")
    first = ann.post_json("/chats", {"user_id": bob.user["id"]}).json
    second = ann.post_json("/chats", {"user_id": carl.user["id"]}).json
    assert [c["id"] for c in ann.get("/chats").json["chats"]] == [second["id"], first["id"]]
    send(bob, first["id"], "bump")
    assert [c["id"] for c in ann.get("/chats").json["chats"]] == [first["id"], second["id"]]


def test_list_chats_shows_last_message_and_unread(ann, bob, chat):
    send(bob, chat["id"], "one")
    last = send(bob, chat["id"], "two")
    listed = ann.get("/chats").json["chats"]
    assert [(c["last_message"], c["unread_count"]) for c in listed] == [(last, 2)]


def test_list_chats_only_own(login, chat):
    assert login().get("/chats").json["chats"] == []


def test_get_chat(ann, chat):
    assert ann.get(f"/chats/{chat['id']}").json == chat


def test_list_chats_next_offset_brings_exactly_what_follows(ann, bob, chat):
    send(bob, chat["id"], "before")
    listed = ann.get("/chats").json
    after = send(bob, chat["id"], "after")
    assert [update["message"] for update in updates(ann, offset=listed["next_offset"])] == [after]


def test_list_chats_next_offset_with_no_updates(login):
    client = login()
    assert client.get("/chats").json == {"chats": [], "next_offset": 1}


def test_chat_read_marks_for_new_messages_and_seen(ann, bob, chat):
    first, second = send(ann, chat["id"], "one"), send(ann, chat["id"], "two")
    bob.post_json(f"/chats/{chat['id']}/read", {"message_id": first["id"]})
    seen = ann.get(f"/chats/{chat['id']}").json, bob.get(f"/chats/{chat['id']}").json
    assert [(c["last_read_id"], c["others_read_id"]) for c in seen] == [(second["id"], first["id"]),
                                                                        (first["id"], second["id"])]


def test_group_others_read_id_is_the_highest_other_mark(ann, bob, carol, group):
    first, second = send(ann, group["id"], "one"), send(ann, group["id"], "two")
    bob.post_json(f"/chats/{group['id']}/read", {"message_id": first["id"]})
    carol.post_json(f"/chats/{group['id']}/read", {"message_id": second["id"]})
    assert ann.get(f"/chats/{group['id']}").json["others_read_id"] == second["id"]


def test_list_members_as_users(ann, bob, carol, group):
    send(bob, group["id"], "hi")
    assert carol.get(f"/chats/{group['id']}/members").json == {"users": [
        user_json(ann.user["id"], "", "ann", "Ann Lee"), user_json(bob.user["id"], "bob@example.com", "bob"),
        user_json(carol.user["id"], carol.user["email"], carol.user["username"])]}


def test_list_members_of_a_dialog(ann, bob, chat):
    assert [user["id"] for user in ann.get(f"/chats/{chat['id']}/members").json["users"]] == \
        [ann.user["id"], bob.user["id"]]


def test_list_members_of_others_chat_is_not_found(login, chat):
    assert error(login().get(f"/chats/{chat['id']}/members", status=400)) == ("chat_not_found", None)


def test_get_chat_of_others_is_not_found(login, chat):
    assert error(login().get(f"/chats/{chat['id']}", status=400)) == ("chat_not_found", None)


def test_get_chat_unknown(ann):
    assert error(ann.get("/chats/999", status=400)) == ("chat_not_found", None)


def test_send_message_returns_it(ann, chat):
    message = send(ann, chat["id"], "hello\n\tworld")
    assert message == {"id": message["id"], "chat_id": chat["id"], "author_id": ann.user["id"],
                       "text": "hello\n\tworld", "files": [], "reply_to_id": None, "client_id": None,
                       "created_at": message["created_at"], "edited_at": None, "reactions": {}}


def test_send_message_moves_authors_read_mark(ann, bob, chat):
    send(bob, chat["id"], "hi")
    send(ann, chat["id"], "hello")
    assert ann.get(f"/chats/{chat['id']}").json["unread_count"] == 0
    assert bob.get(f"/chats/{chat['id']}").json["unread_count"] == 1


def test_message_ids_grow(ann, bob, chat):
    ids = [send(client, chat["id"], "x")["id"] for client in (ann, bob, ann)]
    assert ids == sorted(ids) and len(set(ids)) == 3


@pytest.mark.parametrize("body, mnemonic", [
    ({}, "missing_field"),
    ({"text": None}, "missing_field"),
    ({"text": ""}, "invalid_field"),
    ({"text": " \n\t\u3000"}, "invalid_field"),
    ({"text": "x" * 4097}, "invalid_field"),
    ({"text": "bell\x07"}, "invalid_field"),
    ({"text": "nul\0"}, "invalid_field"),
    ({"text": "\ud83d"}, "invalid_field"),
    ({"text": 42}, "invalid_field"),
])
def test_send_message_bad_text(ann, chat, body, mnemonic):
    response = ann.post_json(f"/chats/{chat['id']}/messages", body, status=400)
    assert error(response) == (mnemonic, "text")


def test_send_message_longest_text(ann, chat):
    assert send(ann, chat["id"], "я" * 4096)["text"] == "я" * 4096


def test_send_message_to_others_chat_is_not_found(login, chat):
    response = login().post_json(f"/chats/{chat['id']}/messages", {"text": "hi"}, status=400)
    assert error(response) == ("chat_not_found", None)


@pytest.fixture
def history(ann, bob, chat):
    """Five messages alternating authors; their ids."""
    return [send(client, chat["id"], str(n))["id"] for n, client in enumerate((ann, bob) * 2 + (ann,))]


def page(client, chat, **params):
    body = client.get(f"/chats/{chat['id']}/messages", params=params).json
    return [m["id"] for m in body["messages"]], body["has_more"]


def test_history_newest_page_oldest_first(ann, chat, history):
    assert page(ann, chat, limit=2) == (history[3:], True)


def test_history_all_fits(ann, chat, history):
    assert page(ann, chat) == (history, False)


def test_history_before(ann, chat, history):
    assert page(ann, chat, before=history[3], limit=2) == (history[1:3], True)
    assert page(ann, chat, before=history[1], limit=2) == (history[:1], False)


def test_history_after(ann, chat, history):
    assert page(ann, chat, after=history[0], limit=2) == (history[1:3], True)
    assert page(ann, chat, after=history[2], limit=2) == (history[3:], False)
    assert page(ann, chat, after=0, limit=5) == (history, False)


def test_history_message_objects(ann, chat, history):
    body = ann.get(f"/chats/{chat['id']}/messages", params={"limit": 1}).json
    assert body == {"messages": [{"id": history[-1], "chat_id": chat["id"], "author_id": ann.user["id"],
                                  "text": "4", "files": [], "reply_to_id": None, "client_id": None,
                                  "created_at": body["messages"][0]["created_at"],
                                  "edited_at": None, "reactions": {}}],
                    "has_more": True}


@pytest.mark.parametrize("params, field", [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "ten"}, "limit"),
    ({"before": 0}, "before"), ({"before": -1}, "before"), ({"before": 2**63}, "before"),
    ({"after": -1}, "after"), ({"after": "１"}, "after"), ({"before": 5, "after": 1}, "before"),
])
def test_history_bad_query(ann, chat, params, field):
    response = ann.get(f"/chats/{chat['id']}/messages", params=params, status=400)
    assert error(response) == ("invalid_field", field)


def test_history_of_others_chat_is_not_found(login, chat):
    response = login().get(f"/chats/{chat['id']}/messages", status=400)
    assert error(response) == ("chat_not_found", None)


def test_read_defaults_to_newest(bob, chat, history):
    assert bob.post_json(f"/chats/{chat['id']}/read", {}).json == {"unread_count": 0}


def test_read_up_to_a_message(ann, bob, chat):
    first = send(ann, chat["id"], "one")
    send(ann, chat["id"], "two")
    send(ann, chat["id"], "three")
    assert bob.post_json(f"/chats/{chat['id']}/read", {"message_id": first["id"]}).json == \
        {"unread_count": 2}


def test_read_mark_only_moves_forward(bob, chat, history):
    bob.post_json(f"/chats/{chat['id']}/read", {"message_id": history[4]})
    assert bob.post_json(f"/chats/{chat['id']}/read", {"message_id": history[0]}).json == \
        {"unread_count": 0}


def test_read_empty_chat(ann, chat):
    assert ann.post_json(f"/chats/{chat['id']}/read", {}).json == {"unread_count": 0}


def test_read_message_of_another_chat(login, ann, bob, chat):
    carl = login()
    other = carl.post_json("/chats", {"user_id": bob.user["id"]}).json
    foreign = send(carl, other["id"], "elsewhere")["id"]
    response = ann.post_json(f"/chats/{chat['id']}/read", {"message_id": foreign}, status=400)
    assert error(response) == ("invalid_field", "message_id")


@pytest.mark.parametrize("message_id", ["1", 0, True, 1.5, 2**64])
def test_read_bad_message_id(ann, chat, message_id):
    response = ann.post_json(f"/chats/{chat['id']}/read", {"message_id": message_id}, status=400)
    assert error(response) == ("invalid_field", "message_id")


def test_read_others_chat_is_not_found(login, chat):
    response = login().post_json(f"/chats/{chat['id']}/read", {}, status=400)
    assert error(response) == ("chat_not_found", None)


# Groups (contract 5, chats)


def make_group(client, name="Trip", *members):
    return client.post_json("/chats", {"name": name, "member_ids": [m.user["id"] for m in members]}).json


def add_users(app, count):
    """Store `count` users straight into the database, for tests that need many; their ids."""
    with app.db.transaction() as conn:
        first = conn.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0]
        return [messenger._insert_user(conn, f"many{n}@example.com", f"many{n}", "x")
                for n in range(first, first + count)]


@pytest.fixture
def carol(login):
    return login("carol@example.com", username="carol")


@pytest.fixture
def group(ann, bob, carol):
    """Ann's group with Bob and Carol."""
    return make_group(ann, "Trip", bob, carol)


def test_create_group_returns_the_group(ann, bob, carol, group):
    assert group == {"id": group["id"], "type": "group", "name": "Trip",
                     "members": [ann.user["id"], bob.user["id"], carol.user["id"]],
                     "owner_id": ann.user["id"], "last_message": None, "unread_count": 0,
                     "last_read_id": 0, "others_read_id": 0, "created_at": group["created_at"]}


def test_create_group_ignores_duplicates_and_the_caller(ann, bob):
    body = {"name": "Us", "member_ids": [bob.user["id"], bob.user["id"], ann.user["id"]]}
    assert ann.post_json("/chats", body).json["members"] == [ann.user["id"], bob.user["id"]]


def test_create_group_alone_and_twice(ann):
    first, second = make_group(ann, "Notes"), make_group(ann, "Notes")
    assert (first["members"], second["members"]) == ([ann.user["id"]], [ann.user["id"]])
    assert first["id"] != second["id"]


def test_create_group_reaches_every_member(ann, bob, carol, group):
    for client in (ann, bob, carol):
        assert updates(client)[-1]["chat"] == client.get(f"/chats/{group['id']}").json


@pytest.mark.parametrize("body, mnemonic, field", [
    ({"name": ""}, "invalid_field", "name"),
    ({"name": " \t"}, "invalid_field", "name"),
    ({"name": "n" * 129}, "invalid_field", "name"),
    ({"name": "a\x01b"}, "invalid_field", "name"),
    ({"name": 5}, "invalid_field", "name"),
    ({"name": "Trip", "member_ids": "2"}, "invalid_field", "member_ids"),
    ({"name": "Trip", "member_ids": [True]}, "invalid_field", "member_ids"),
    ({"name": "Trip", "member_ids": [0]}, "invalid_field", "member_ids"),
    ({"name": "Trip", "member_ids": [2**63]}, "invalid_field", "member_ids"),
    ({"name": "Trip", "member_ids": [999]}, "user_not_found", "member_ids"),
    ({"name": "Trip", "user_id": 2}, "invalid_field", "user_id"),
    ({}, "missing_field", "user_id"),
])
def test_create_group_bad_body(ann, body, mnemonic, field):
    assert error(ann.post_json("/chats", body, status=400)) == (mnemonic, field)


def test_create_group_name_at_its_limit(ann):
    assert make_group(ann, "n" * 128)["name"] == "n" * 128


def test_create_group_of_100_members(app, ann):
    others = add_users(app, 99)
    assert len(ann.post_json("/chats", {"name": "Big", "member_ids": others}).json["members"]) == 100


def test_create_group_of_101_members_is_invalid(app, ann):
    others = add_users(app, 100)
    response = ann.post_json("/chats", {"name": "Big", "member_ids": others}, status=400)
    assert error(response) == ("invalid_field", "member_ids")


def test_rename_group(ann, bob, group):
    renamed = bob.put_json(f"/chats/{group['id']}", {"name": "Trip to Kazan"}).json
    assert renamed == dict(group, name="Trip to Kazan")
    assert updates(ann)[-1]["chat"]["name"] == "Trip to Kazan"


def test_rename_dialog_is_forbidden(ann, chat):
    response = ann.put_json(f"/chats/{chat['id']}", {"name": "Us"}, status=403)
    assert error(response) == ("forbidden", None)


@pytest.mark.parametrize("body, mnemonic", [({}, "missing_field"), ({"name": ""}, "invalid_field"),
                                            ({"name": "n" * 129}, "invalid_field")])
def test_rename_group_bad_name(ann, group, body, mnemonic):
    assert error(ann.put_json(f"/chats/{group['id']}", body, status=400)) == (mnemonic, "name")


def test_add_member(ann, bob, login, group):
    dave = login("dave@example.com")
    chat = bob.post_json(f"/chats/{group['id']}/members", {"user_id": dave.user["id"]}).json
    assert chat == dict(group, members=group["members"] + [dave.user["id"]])
    assert updates(dave)[-1]["chat"] == dave.get(f"/chats/{group['id']}").json


def test_add_member_twice_changes_nothing(ann, bob, group):
    updates_before = updates(ann)
    chat = ann.post_json(f"/chats/{group['id']}/members", {"user_id": bob.user["id"]}).json
    assert (chat, updates(ann)) == (group, updates_before)


def test_new_member_sees_the_history_with_nothing_unread(ann, login, group):
    sent = [send(ann, group["id"], text)["id"] for text in ("one", "two")]
    dave = login("dave@example.com")
    ann.post_json(f"/chats/{group['id']}/members", {"user_id": dave.user["id"]})
    assert page(dave, group) == (sent, False)
    assert dave.get(f"/chats/{group['id']}").json["unread_count"] == 0


@pytest.mark.parametrize("body, mnemonic", [({}, "missing_field"), ({"user_id": "2"}, "invalid_field"),
                                            ({"user_id": 999}, "user_not_found")])
def test_add_member_bad_user(ann, group, body, mnemonic):
    response = ann.post_json(f"/chats/{group['id']}/members", body, status=400)
    assert error(response) == (mnemonic, "user_id")


def test_add_member_to_a_dialog_is_forbidden(ann, login, chat):
    dave = login("dave@example.com")
    response = ann.post_json(f"/chats/{chat['id']}/members", {"user_id": dave.user["id"]}, status=403)
    assert error(response) == ("forbidden", None)


def test_add_member_to_a_full_group_is_invalid(app, ann):
    full = ann.post_json("/chats", {"name": "Full", "member_ids": add_users(app, 99)}).json
    response = ann.post_json(f"/chats/{full['id']}/members", {"user_id": add_users(app, 1)[0]},
                             status=400)
    assert error(response) == ("invalid_field", "user_id")


def test_leave_group(ann, bob, carol, group):
    assert bob.delete(f"/chats/{group['id']}/members/{bob.user['id']}").json == {}
    assert ann.get(f"/chats/{group['id']}").json["members"] == [ann.user["id"], carol.user["id"]]
    assert [u["type"] for u in updates(bob)][-1] == "chat_removed"


def test_owner_removes_a_member(ann, bob, carol, group):
    chat = ann.delete(f"/chats/{group['id']}/members/{carol.user['id']}").json
    assert chat == dict(group, members=[ann.user["id"], bob.user["id"]])
    last = updates(carol)[-1]
    assert last == {"update_id": last["update_id"], "type": "chat_removed", "chat_id": group["id"]}


def test_non_owner_removing_a_member_is_forbidden(bob, carol, group):
    response = bob.delete(f"/chats/{group['id']}/members/{carol.user['id']}", status=403)
    assert error(response) == ("forbidden", None)


def test_removing_a_non_member_changes_nothing(ann, login, group):
    dave = login("dave@example.com")
    assert ann.delete(f"/chats/{group['id']}/members/{dave.user['id']}").json == group


def test_removing_a_non_member_changes_nothing_for_any_member(bob, login, group):
    dave = login("dave@example.com")
    assert bob.delete(f"/chats/{group['id']}/members/{dave.user['id']}").json == dict(group, unread_count=0)


def test_deleted_group_id_is_never_used_again(ann):
    gone = make_group(ann, "Gone")
    ann.delete(f"/chats/{gone['id']}/members/{ann.user['id']}")
    assert make_group(ann, "New")["id"] > gone["id"]


def test_chat_opened_after_a_deleted_message_sorts_above_older_ones(ann, bob, carol, chat):
    send(ann, chat["id"], "kept")
    deleted = send(ann, chat["id"], "the newest on the server")
    ann.delete(f"/chats/{chat['id']}/messages/{deleted['id']}")
    newer = ann.post_json("/chats", {"user_id": carol.user["id"]}).json
    assert [c["id"] for c in ann.get("/chats").json["chats"]] == [newer["id"], chat["id"]]


@pytest.mark.parametrize("user, mnemonic, field", [("999", "user_not_found", None),
                                                   ("0", "invalid_field", "user_id"),
                                                   ("abc", "invalid_field", "user_id")])
def test_remove_member_bad_user(ann, group, user, mnemonic, field):
    response = ann.delete(f"/chats/{group['id']}/members/{user}", status=400)
    assert error(response) == (mnemonic, field)


def test_remove_member_of_a_dialog_is_forbidden(ann, bob, chat):
    response = ann.delete(f"/chats/{chat['id']}/members/{bob.user['id']}", status=403)
    assert error(response) == ("forbidden", None)


def test_owner_leaving_hands_the_group_to_the_earliest_member(ann, bob, carol, login, group):
    dave = login("dave@example.com")
    ann.post_json(f"/chats/{group['id']}/members", {"user_id": dave.user["id"]})
    ann.delete(f"/chats/{group['id']}/members/{ann.user['id']}")
    assert dave.get(f"/chats/{group['id']}").json["owner_id"] == bob.user["id"]


def test_last_member_leaving_deletes_the_group(app, ann):
    alone = make_group(ann, "Alone")
    send(ann, alone["id"], "echo")
    ann.delete(f"/chats/{alone['id']}/members/{ann.user['id']}")
    assert query(app, "SELECT count(*) FROM chats WHERE id = ?", alone["id"]) == [(0,)]
    assert query(app, "SELECT count(*) FROM messages_search") == [(0,)]


def test_former_members_messages_stay(ann, bob, group):
    message = send(bob, group["id"], "bye all")
    bob.delete(f"/chats/{group['id']}/members/{bob.user['id']}")
    assert ann.get(f"/chats/{group['id']}/messages").json["messages"] == [message]


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/chats/{chat}", None), ("PUT", "/chats/{chat}", {"name": "Mine"}),
    ("POST", "/chats/{chat}/members", {"user_id": 1}), ("DELETE", "/chats/{chat}/members/1", None),
    ("GET", "/chats/{chat}/messages", None), ("POST", "/chats/{chat}/messages", {"text": "back"}),
    ("PUT", "/chats/{chat}/messages/{message}", {"text": "changed"}),
    ("DELETE", "/chats/{chat}/messages/{message}", None),
    ("PUT", "/chats/{chat}/messages/{message}/reaction", {"emoji": "👍"}),
    ("DELETE", "/chats/{chat}/messages/{message}/reaction", None),
    ("POST", "/chats/{chat}/read", {}), ("GET", "/messages?query=hi&chat_id={chat}", None),
])
def test_former_member_finds_no_chat(ann, bob, group, method, path, body):
    message = send(bob, group["id"], "hi")
    bob.delete(f"/chats/{group['id']}/members/{bob.user['id']}")
    response = bob.request(path.format(chat=group["id"], message=message["id"]), method=method,
                           body=json.dumps(body).encode() if body else b"", status=400)
    assert error(response) == ("chat_not_found", None)


def test_former_member_gets_no_updates_after_removal(ann, bob, group):
    bob.delete(f"/chats/{group['id']}/members/{bob.user['id']}")
    removed = updates(bob)
    message = send(ann, group["id"], "after")
    ann.put_json(f"/chats/{group['id']}", {"name": "New name"})
    ann.put_json(f"/chats/{group['id']}/messages/{message['id']}/reaction", {"emoji": "👍"})
    assert updates(bob) == removed and removed[-1]["type"] == "chat_removed"
    assert bob.get("/chats").json["chats"] == []
    assert bob.get("/messages", params={"query": "after"}).json == {"messages": [], "has_more": False}


# Edits, deletions and reactions (contract 5, messages)


def test_edit_message(ann, bob, chat):
    message = send(ann, chat["id"], "helo")
    edited = ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", {"text": "hello"}).json
    assert edited == dict(message, text="hello", edited_at=edited["edited_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", edited["edited_at"])
    assert ann.get(f"/chats/{chat['id']}/messages").json["messages"] == [edited]
    last = updates(bob)[-1]
    assert last == {"update_id": last["update_id"], "type": "message_edited", "message": edited}


def test_edit_message_with_the_same_text_changes_nothing(ann, chat):
    message = send(ann, chat["id"], "hello")
    before = updates(ann)
    assert ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", {"text": "hello"}).json == message
    assert updates(ann) == before


def test_edit_someone_elses_message_is_forbidden(ann, bob, chat):
    message = send(ann, chat["id"], "mine")
    response = bob.put_json(f"/chats/{chat['id']}/messages/{message['id']}", {"text": "ours"}, status=403)
    assert error(response) == ("forbidden", None)


@pytest.mark.parametrize("body, mnemonic", [({}, "missing_field"), ({"text": " "}, "invalid_field"),
                                            ({"text": "t" * 4097}, "invalid_field")])
def test_edit_message_bad_text(ann, chat, body, mnemonic):
    message = send(ann, chat["id"], "hello")
    response = ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", body, status=400)
    assert error(response) == (mnemonic, "text")


def test_message_of_another_chat_is_not_found(ann, chat, group):
    message = send(ann, group["id"], "in the group")
    for method, suffix, body in (("PUT", "", {"text": "x"}), ("DELETE", "", None),
                                 ("PUT", "/reaction", {"emoji": "👍"}), ("DELETE", "/reaction", None)):
        response = ann.request(f"/chats/{chat['id']}/messages/{message['id']}{suffix}", method=method,
                               body=json.dumps(body).encode() if body else b"", status=400)
        assert error(response) == ("message_not_found", None)


def test_delete_message(ann, bob, chat):
    kept, deleted = send(ann, chat["id"], "kept"), send(ann, chat["id"], "oops")
    assert ann.delete(f"/chats/{chat['id']}/messages/{deleted['id']}").json == {}
    assert ann.get(f"/chats/{chat['id']}/messages").json["messages"] == [kept]
    assert bob.get(f"/chats/{chat['id']}").json["last_message"] == kept
    assert bob.get(f"/chats/{chat['id']}").json["unread_count"] == 1
    last = updates(bob)[-1]
    assert last == {"update_id": last["update_id"], "type": "message_deleted", "chat_id": chat["id"],
                    "message_id": deleted["id"]}


def test_deleted_message_id_is_never_used_again(ann, chat):
    deleted = send(ann, chat["id"], "the newest")
    ann.delete(f"/chats/{chat['id']}/messages/{deleted['id']}")
    assert send(ann, chat["id"], "next")["id"] > deleted["id"]


def test_delete_message_twice_is_not_found(ann, chat):
    message = send(ann, chat["id"], "once")
    ann.delete(f"/chats/{chat['id']}/messages/{message['id']}")
    response = ann.delete(f"/chats/{chat['id']}/messages/{message['id']}", status=400)
    assert error(response) == ("message_not_found", None)


def test_delete_someone_elses_message_is_forbidden(ann, bob, chat):
    message = send(ann, chat["id"], "mine")
    response = bob.delete(f"/chats/{chat['id']}/messages/{message['id']}", status=403)
    assert error(response) == ("forbidden", None)


def test_group_owner_deletes_any_message(ann, bob, group):
    message = send(bob, group["id"], "spam")
    assert ann.delete(f"/chats/{group['id']}/messages/{message['id']}").json == {}
    assert ann.get(f"/chats/{group['id']}/messages").json["messages"] == []


def test_group_member_deleting_anothers_message_is_forbidden(ann, bob, group):
    message = send(ann, group["id"], "the owner's")
    response = bob.delete(f"/chats/{group['id']}/messages/{message['id']}", status=403)
    assert error(response) == ("forbidden", None)


def test_react_to_a_message(ann, bob, chat):
    message = send(ann, chat["id"], "hello")
    reacted = bob.put_json(f"/chats/{chat['id']}/messages/{message['id']}/reaction", {"emoji": "👍"}).json
    assert reacted == dict(message, reactions={"👍": [bob.user["id"]]})
    assert ann.get(f"/chats/{chat['id']}").json["last_message"] == reacted
    last = updates(ann)[-1]
    assert last == {"update_id": last["update_id"], "type": "reaction", "chat_id": chat["id"],
                    "message_id": message["id"], "user_id": bob.user["id"], "emoji": "👍"}


def test_reactions_list_users_in_order(ann, bob, carol, group):
    message = send(ann, group["id"], "vote")
    for client, emoji in ((carol, "👍"), (ann, "👍"), (bob, "🎉")):
        client.put_json(f"/chats/{group['id']}/messages/{message['id']}/reaction", {"emoji": emoji})
    reactions = ann.get(f"/chats/{group['id']}/messages").json["messages"][0]["reactions"]
    assert reactions == {"🎉": [bob.user["id"]], "👍": [ann.user["id"], carol.user["id"]]}


def test_new_reaction_replaces_yours(ann, chat):
    message = send(ann, chat["id"], "hello")
    path = f"/chats/{chat['id']}/messages/{message['id']}/reaction"
    ann.put_json(path, {"emoji": "👍"})
    assert ann.put_json(path, {"emoji": "❤️"}).json["reactions"] == {"❤️": [ann.user["id"]]}


def test_same_reaction_twice_changes_nothing(ann, chat):
    message = send(ann, chat["id"], "hello")
    path = f"/chats/{chat['id']}/messages/{message['id']}/reaction"
    first = ann.put_json(path, {"emoji": "👍"}).json
    before = updates(ann)
    assert (ann.put_json(path, {"emoji": "👍"}).json, updates(ann)) == (first, before)


def test_remove_reaction(ann, bob, chat):
    message = send(ann, chat["id"], "hello")
    path = f"/chats/{chat['id']}/messages/{message['id']}/reaction"
    ann.put_json(path, {"emoji": "👍"})
    assert ann.delete(path).json == message
    assert updates(bob)[-1]["emoji"] is None
    before = updates(bob)
    assert (ann.delete(path).json, updates(bob)) == (message, before)  # none left: no change


@pytest.mark.parametrize("body, mnemonic", [({}, "missing_field"), ({"emoji": ""}, "invalid_field"),
                                            ({"emoji": "x" * 17}, "invalid_field"),
                                            ({"emoji": "a b"}, "invalid_field"),
                                            ({"emoji": "a\x01"}, "invalid_field"),
                                            ({"emoji": "\u200b"}, "invalid_field"),
                                            ({"emoji": "\u0301\u200d"}, "invalid_field"),
                                            ({"emoji": 1}, "invalid_field")])
def test_reaction_bad_emoji(ann, chat, body, mnemonic):
    message = send(ann, chat["id"], "hello")
    response = ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}/reaction", body, status=400)
    assert error(response) == (mnemonic, "emoji")


def test_reactions_are_nfc_so_two_es_are_one(ann, bob, chat):
    message = send(ann, chat["id"], "hello")
    path = f"/chats/{chat['id']}/messages/{message['id']}/reaction"
    ann.put_json(path, {"emoji": "e\u0301"})
    reacted = bob.put_json(path, {"emoji": "\u00e9"}).json
    assert reacted["reactions"] == {"\u00e9": sorted([ann.user["id"], bob.user["id"]])}


def test_reaction_of_16_characters(ann, chat):
    message = send(ann, chat["id"], "hello")
    family = "👨‍👩‍👧‍👦" + "x" * 9  # one emoji of seven code points, and nine letters
    reacted = ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}/reaction", {"emoji": family})
    assert reacted.json["reactions"] == {family: [ann.user["id"]]}


def test_read_in_a_group_reaches_only_the_reader(ann, bob, carol, group):
    send(ann, group["id"], "news")
    before = [[update["update_id"] for update in updates(client)] for client in (ann, carol)]
    bob.post_json(f"/chats/{group['id']}/read", {})
    assert [[update["update_id"] for update in updates(client)] for client in (ann, carol)] == before
    assert updates(bob)[-1]["type"] == "read"


@pytest.fixture
def unread_world(app, ann, bob, carol, login):
    """A group and a dialog with a random history of sends, edits, deletions, reads, joins
    and leaves; every client of it, by user id."""
    rng = random.Random(12)
    dave = login("dave@example.com")
    clients = {client.user["id"]: client for client in (ann, bob, carol, dave)}
    chats = [make_group(ann, "Mix", bob, carol)["id"],
             ann.post_json("/chats", {"user_id": bob.user["id"]}).json["id"]]
    for _ in range(300):
        chat_id = rng.choice(chats)
        client = rng.choice(list(clients.values()))
        members = client.get(f"/chats/{chat_id}", status=(200, 400)).json.get("members", [])
        if client.user["id"] not in members:
            continue
        mine = [m["id"] for m in client.get(f"/chats/{chat_id}/messages?limit=100").json["messages"]
                if m["author_id"] == client.user["id"]]
        action = rng.choice(["send", "send", "send", "edit", "delete", "read", "read", "join", "leave"])
        if action == "send":
            send(client, chat_id, "m")
        elif action == "edit" and mine:
            client.put_json(f"/chats/{chat_id}/messages/{rng.choice(mine)}", {"text": str(rng.random())})
        elif action == "delete" and mine:
            client.delete(f"/chats/{chat_id}/messages/{rng.choice(mine)}")
        elif action == "read":
            ids = [m["id"] for m in client.get(f"/chats/{chat_id}/messages?limit=100").json["messages"]]
            if ids:
                client.post_json(f"/chats/{chat_id}/read", {"message_id": rng.choice(ids)})
        elif action == "join" and chat_id == chats[0]:
            client.post_json(f"/chats/{chat_id}/members", {"user_id": rng.choice(list(clients))})
        elif action == "leave" and chat_id == chats[0] and len(members) > 1:
            client.delete(f"/chats/{chat_id}/members/{client.user['id']}")
    return clients, chats


def whole_history(client, chat_id):
    messages, after = [], 0
    while True:
        body = client.get(f"/chats/{chat_id}/messages", params={"after": after, "limit": 100}).json
        messages += body["messages"]
        if not body["has_more"]:
            return messages
        after = messages[-1]["id"]


def test_unread_counts_stay_exact(app, unread_world):
    clients, chats = unread_world
    for user_id, client in clients.items():
        for chat in client.get("/chats").json["chats"]:
            (read_mark,), = query(app, "SELECT last_read_id FROM chat_members WHERE chat_id = ?"
                                       " AND user_id = ?", chat["id"], user_id)
            history = whole_history(client, chat["id"])
            expected = sum(1 for m in history if m["id"] > read_mark and m["author_id"] != user_id)
            assert chat["unread_count"] == expected, (user_id, chat["id"])


# Message search (contract 5, GET /messages)


def search_texts(client, query, **params):
    body = client.get("/messages", params=dict(params, query=query)).json
    return [m["text"] for m in body["messages"]], body["has_more"]


def test_search_messages_by_word_beginnings(ann, bob, chat):
    for text in ("Привет, мир!", "мир и привет", "приветствую", "no match"):
        send(ann, chat["id"], text)
    assert search_texts(bob, "пр мир") == (["мир и привет", "Привет, мир!"], False)


def test_search_messages_folds_case_fully(ann, chat):
    send(ann, chat["id"], "Die Straße ist LANG")
    assert search_texts(ann, "STRASSE lang") == (["Die Straße ist LANG"], False)


def test_search_messages_only_in_your_chats(ann, bob, login, chat):
    send(ann, chat["id"], "secret plan")
    outsider = login()
    assert search_texts(outsider, "secret") == ([], False)


def test_search_messages_reads_yo_as_ye(ann, chat):
    send(ann, chat["id"], "Пётр пришёл")
    assert search_texts(ann, "петр пришел") == (["Пётр пришёл"], False)


def test_search_reads_only_the_searchers_chats(app, ann, bob, login, chat):
    send(bob, chat["id"], "bluefish")
    outsider = login()
    assert search_texts(outsider, "bluef") == ([], False)
    assert query(app, "SELECT indexed_up_to FROM chats WHERE id = ?", chat["id"]) == [(0,)]
    assert query(app, "SELECT count(*) FROM messages_search") == [(0,)]


def test_search_messages_in_one_chat(ann, bob, chat, group):
    send(ann, chat["id"], "plan one")
    send(ann, group["id"], "plan two")
    assert search_texts(ann, "plan", chat_id=group["id"]) == (["plan two"], False)


def test_search_messages_pages_with_before(ann, chat):
    ids = [send(ann, chat["id"], f"item {n}")["id"] for n in range(5)]
    assert search_texts(ann, "item", limit=2) == (["item 4", "item 3"], True)
    assert search_texts(ann, "item", limit=2, before=ids[3]) == (["item 2", "item 1"], True)
    assert search_texts(ann, "item", limit=2, before=ids[1]) == (["item 0"], False)


def test_search_messages_skips_deleted_and_finds_edited(ann, chat):
    gone, changed = send(ann, chat["id"], "apple pie"), send(ann, chat["id"], "banana")
    ann.delete(f"/chats/{chat['id']}/messages/{gone['id']}")
    ann.put_json(f"/chats/{chat['id']}/messages/{changed['id']}", {"text": "apple tart"})
    assert search_texts(ann, "apple") == (["apple tart"], False)


def test_search_messages_follows_edits_and_deletions_of_indexed_messages(ann, chat):
    gone, changed = send(ann, chat["id"], "apple pie"), send(ann, chat["id"], "banana")
    assert search_texts(ann, "apple") == (["apple pie"], False)  # both indexed now
    ann.delete(f"/chats/{chat['id']}/messages/{gone['id']}")
    ann.put_json(f"/chats/{chat['id']}/messages/{changed['id']}", {"text": "apple tart"})
    send(ann, chat["id"], "apple juice")
    assert search_texts(ann, "apple") == (["apple juice", "apple tart"], False)
    assert search_texts(ann, "banana") == ([], False)


@pytest.mark.parametrize("params, mnemonic, field", [
    ({}, "missing_field", "query"), ({"query": ""}, "invalid_field", "query"),
    ({"query": "q" * 65}, "invalid_field", "query"), ({"query": "a\x01"}, "invalid_field", "query"),
    ({"query": "?!"}, "invalid_field", "query"), ({"query": "a", "limit": 0}, "invalid_field", "limit"),
    ({"query": "a", "before": 0}, "invalid_field", "before"),
    ({"query": "a", "chat_id": "x"}, "invalid_field", "chat_id"),
    ({"query": "a", "chat_id": 999}, "chat_not_found", None),
])
def test_search_messages_bad_query(ann, params, mnemonic, field):
    assert error(ann.get("/messages", params=params, status=400)) == (mnemonic, field)


def test_search_indexes_many_messages_in_batches(ann, chat, monkeypatch):
    monkeypatch.setattr(messenger, "SEARCH_BATCH", 2)
    for n in range(5):
        send(ann, chat["id"], f"batch {n}")
    assert search_texts(ann, "batch") == ([f"batch {n}" for n in range(4, -1, -1)], False)


def test_search_without_fts5(make_app, monkeypatch):
    monkeypatch.setattr(messenger, "_has_fts5_trigram", lambda conn: False)
    app = make_app(":memory:")
    ann, bob = logged_in(app, "ann@example.com", username="annabel"), logged_in(app, "bob@example.com")
    chat = ann.post_json("/chats", {"user_id": bob.user["id"]}).json
    send(ann, chat["id"], "Привет, мир!")
    assert not app.db.search_index
    assert search_texts(bob, "пр МИР") == (["Привет, мир!"], False)
    assert search(bob, "nabe") == ["annabel"]


SEARCH_TEXTS = ["Привет, мир!", "ПРИВЕТСТВУЮ всех", "мир, труд, май", "Die Straße", "strasse 5",
                "naïve café", "NAÏVE", "x_y z", "100% sure", "e-mail me", "ёлка и елка", "Ёжик",
                "日本語のテキスト", "emoji 👍 here", "tab\there", "a", "ab abc abcd", "नमस्ते दुनिया"]


@pytest.fixture(scope="module")
def many_messages(tmp_path_factory):
    """An app whose user 1 is in two of three chats, each holding all of SEARCH_TEXTS."""
    app = messenger.make_app(str(tmp_path_factory.mktemp("messages") / "m.db"))
    with app.db.transaction() as conn:
        for n in range(3):
            messenger._insert_user(conn, f"u{n}@example.com", f"u{n}", "x")
        for low, high in ((1, 2), (1, 3), (2, 3)):
            chat_id = messenger._insert_chat(conn, None, [low, high], "t")
            for text in SEARCH_TEXTS:
                messenger._insert_message(conn, chat_id, low, text, "t")
    messenger.index_messages(app.db, 1)
    yield app
    app.db.close()


@pytest.mark.parametrize("query", ["пр", "ПРИВЕТ", "мир", "пр мир", "strasse", "STRAßE", "naïve",
                                   "naive", "x", "y", "e mail", "100", "ёл", "ел", "ёж", "日本", "👍",
                                   "emoji", "here", "a", "abc", "नमस्ते", "दुन", "zzz", "мир май"])
@pytest.mark.parametrize("chat_id, before, limit", [(None, None, 50), (2, None, 50), (None, 40, 3)])
@pytest.mark.parametrize("use_index", [True, False], ids=["index", "scan"])
def test_find_messages_matches_a_reference(many_messages, query, chat_id, before, limit, use_index):
    # The contract, in Python: each query word starts a word of the text,
    # words being runs of letters, digits and marks, after NFC and case
    # folding, ё read as е.
    def words(text):
        folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold()).replace("ё", "е")
        return "".join(c if unicodedata.category(c)[0] in "LNM" or unicodedata.category(c) == "Co"
                       else " " for c in folded).split()
    with many_messages.db.connection() as conn:
        rows = conn.execute("SELECT m.id, m.text, m.chat_id FROM messages AS m JOIN chat_members AS cm"
                            " ON cm.chat_id = m.chat_id AND cm.user_id = 1 ORDER BY m.id DESC").fetchall()
        reference = [
            m_id for m_id, text, chat in rows
            if (chat_id is None or chat == chat_id) and (before is None or m_id < before)
            and words(query) and all(any(w.startswith(q) for w in words(text)) for q in words(query))
        ]
        found = [json.loads(row[0])["id"] for row in messenger.find_messages(
            conn, 1, messenger._search_words(query), chat_id, before or messenger.MAX_ID, limit, use_index)]
    assert found == reference[:limit]


# Typing (contract 5, POST /chats/{id}/typing; 6, the typing update)


def typing_updates(client):
    return [(u["chat_id"], u["user_id"], u["typing"]) for u in updates(client) if u["type"] == "typing"]


def test_typing_reaches_the_other_members_not_the_typist(ann, bob, carol, group):
    assert ann.post_json(f"/chats/{group['id']}/typing", {"typing": True}).json == {}
    expected = [(group["id"], ann.user["id"], True)]
    assert typing_updates(bob) == typing_updates(carol) == expected
    assert typing_updates(ann) == []


@pytest.mark.parametrize("body", [{}, {"typing": None}])
def test_typing_defaults_to_true(ann, bob, chat, body):
    ann.post_json(f"/chats/{chat['id']}/typing", body)
    assert typing_updates(bob) == [(chat["id"], ann.user["id"], True)]


def test_typing_true_again_within_three_seconds_sends_nothing(ann, bob, chat):
    for typing in (True, True, False, True):
        ann.post_json(f"/chats/{chat['id']}/typing", {"typing": typing})
    assert [typing for _, _, typing in typing_updates(bob)] == [True, False, True]


def test_typing_true_again_after_three_seconds_is_sent(ann, bob, chat, monkeypatch):
    ann.post_json(f"/chats/{chat['id']}/typing", {})
    clock = time.monotonic() + messenger.TYPING_REPEAT_SECONDS
    monkeypatch.setattr(messenger.time, "monotonic", lambda: clock)
    ann.post_json(f"/chats/{chat['id']}/typing", {})
    assert len(typing_updates(bob)) == 2


def test_typing_after_a_message_is_news_again(ann, bob, chat):
    ann.post_json(f"/chats/{chat['id']}/typing", {})
    send(ann, chat["id"], "done typing")
    ann.post_json(f"/chats/{chat['id']}/typing", {})
    assert len(typing_updates(bob)) == 2


def test_typing_older_than_ten_seconds_is_never_answered(app, ann, bob, chat):
    ann.post_json(f"/chats/{chat['id']}/typing", {})
    with app.db.transaction() as conn:
        conn.execute("UPDATE updates SET created_at = created_at - ? WHERE type = 'typing'",
                     (messenger.TYPING_SHOWN_SECONDS + 1,))
    assert typing_updates(bob) == []


def test_typing_wakes_a_waiting_poll(server):
    ann_cookie, bob_cookie, chat_id, offset = two_in_a_chat(server)
    answer = []
    thread = threading.Thread(target=lambda: answer.extend(poll(server, bob_cookie, offset=offset,
                                                                timeout=30)))
    thread.start()
    assert wait_until(lambda: server.app.feed.waiting == 1)
    started = time.monotonic()
    call(f"{server.url}/chats/{chat_id}/typing", "POST", {}, ann_cookie)
    thread.join()
    assert time.monotonic() - started < 2 and [u["type"] for u in answer] == ["typing"]


@pytest.mark.parametrize("body", [{"typing": "yes"}, {"typing": 1}, {"typing": []}])
def test_typing_bad_body_is_invalid_field(ann, chat, body):
    response = ann.post_json(f"/chats/{chat['id']}/typing", body, status=400)
    assert error(response) == ("invalid_field", "typing")


def test_typing_in_others_chat_is_not_found(login, chat):
    response = login().post_json(f"/chats/{chat['id']}/typing", {}, status=400)
    assert error(response) == ("chat_not_found", None)


# Files (contract 5, files), and messages that carry them


def multipart(filename, data, content_type="application/octet-stream", name="file"):
    """A multipart/form-data body of one file part, built by hand so that any name can be sent:
    (body, headers)."""
    boundary = "boundary42"
    disposition = "form-data" + (f'; name="{name}"' if name else "") + (
        "" if filename is None else f'; filename="{filename}"')
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n" + (
        f"Content-Type: {content_type}\r\n" if content_type else "") + "\r\n"
    return (head.encode() + data + f"\r\n--{boundary}--\r\n".encode(),
            {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def upload_file(client, data=b"hello", filename="notes.txt", content_type="text/plain", status=200, **parts):
    body, headers = multipart(filename, data, content_type, **parts)
    response = client.post("/files", body, headers=headers, status=status)
    return response.json if status == 200 else response


def png_header(width, height):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def jpeg_header(width, height, frame=0xC0):
    """A JPEG's start: JFIF and a large EXIF segment, a Huffman table (C4, not a frame), the frame."""
    segments = [(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"), (0xE1, b"Exif\0\0" + b"\0" * 3000),
                (0xDB, b"\0" * 65), (0xC4, b"\0" * 30),
                (frame, struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\0\x02\x11\x01\x03\x11\x01")]
    return b"\xff\xd8" + b"".join(bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data
                                  for marker, data in segments) + b"\xff\xda" + b"\0" * 20


def webp(chunk, data):
    payload = b"WEBP" + chunk + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


IMAGES = {
    "png": (png_header(640, 480), "image/png", 640, 480),
    "demo png": (messenger._demo_picture(), "image/png", *messenger.DEMO_PICTURE_SIZE),
    "gif": (b"GIF89a" + struct.pack("<HH", 320, 200) + b"\0" * 20, "image/gif", 320, 200),
    "gif87": (b"GIF87a" + struct.pack("<HH", 1, 1) + b"\0" * 20, "image/gif", 1, 1),
    "jpeg": (jpeg_header(1920, 1080), "image/jpeg", 1920, 1080),
    "progressive jpeg": (jpeg_header(800, 600, frame=0xC2), "image/jpeg", 800, 600),
    "webp lossy": (webp(b"VP8 ", b"\x30\x01\x00\x9d\x01\x2a" + struct.pack("<HH", 400, 300) + b"\0" * 10),
                   "image/webp", 400, 300),
    "webp lossless": (webp(b"VP8L", b"\x2f" + (1023 | 767 << 14).to_bytes(4, "little") + b"\0" * 10),
                      "image/webp", 1024, 768),
    "webp extended": (webp(b"VP8X", b"\x10\0\0\0" + (4999).to_bytes(3, "little")
                           + (2999).to_bytes(3, "little")),
                      "image/webp", 5000, 3000),
}


def file_json(file_id, name, content_type, size, created_at, width=None, height=None):
    return {"id": file_id, "name": name, "content_type": content_type, "size": size, "width": width,
            "height": height, "url": f"/files/{file_id}", "created_at": created_at}


def test_upload_file_answers_its_object(ann):
    file = upload_file(ann, b"buy milk", "notes.txt", "text/plain")
    assert file == file_json(1, "notes.txt", "text/plain", 8, file["created_at"])


@pytest.mark.parametrize("kind", IMAGES)
def test_upload_file_reads_image_dimensions(ann, kind):
    data, content_type, width, height = IMAGES[kind]
    file = upload_file(ann, data, "picture.bin", "application/octet-stream")
    assert (file["content_type"], file["width"], file["height"]) == (content_type, width, height)


def test_upload_file_image_is_known_by_its_bytes_not_its_declared_type(ann):
    file = upload_file(ann, png_header(2, 3), "page.html", "text/html")
    assert (file["content_type"], file["width"], file["height"]) == ("image/png", 2, 3)


@pytest.mark.parametrize("data", [png_header(5, 5)[:20], b"\x89PNG\r\n\x1a\n", b"GIF89a\x01",
                                  jpeg_header(5, 5)[:3000], b"\xff\xd8\xff\xd9", b"\xff\xd8\xff\xe0\x00",
                                  webp(b"VP8 ", b"\0" * 10), b"RIFF\0\0\0\0WEBPVP8X", png_header(0, 5)])
def test_upload_file_cut_short_image_is_not_an_image(ann, data):
    file = upload_file(ann, data, "broken.png", "application/octet-stream")
    assert (file["content_type"], file["width"], file["height"]) == ("application/octet-stream", None, None)


@pytest.mark.parametrize("declared, kept", [
    ("text/plain", "text/plain"), ("Application/PDF", "application/pdf"),
    ("text/csv; charset=utf-8", "text/csv"), ("video/mp4", "video/mp4"),
    ("image/png", "image/png"),  # not PNG bytes: the declared type, and no dimensions
    (None, "application/octet-stream"), ("nonsense", "application/octet-stream"),
    ("text/", "application/octet-stream"), ("a/b/c", "application/octet-stream"),
    ("text plain/x", "application/octet-stream"),
])
def test_upload_file_keeps_a_well_formed_declared_type(ann, declared, kept):
    file = upload_file(ann, b"some bytes", "a.bin", declared)
    assert (file["content_type"], file["width"]) == (kept, None)


@pytest.mark.parametrize("sent, kept", [
    ("report.pdf", "report.pdf"), ("C:\\Users\\ann\\photo.png", "photo.png"), ("../../etc/passwd", "passwd"),
    ("dir/", "file"), ("/", "file"), ("a\x01b\x7f.txt", "ab.txt"), ("tab\t.txt", "tab.txt"),
    ("cafe\u0301.txt", "café.txt"), ("\u202egnp.exe", "gnp.exe"), ("фото отпуска.jpg", "фото отпуска.jpg"),
    ("x" * 300 + ".pdf", "x" * 251 + ".pdf"), ("x" * 300, "x" * 255),
    ("x" * 300 + ".extension-too-long", ("x" * 300 + ".extension-too-long")[:255]),
])
def test_upload_file_name_rules(ann, sent, kept):
    assert upload_file(ann, filename=sent)["name"] == kept


def test_upload_file_any_field_name_or_none(ann):
    assert upload_file(ann, name="attachment")["name"] == "notes.txt"
    assert upload_file(ann, name=None)["name"] == "notes.txt"


@pytest.mark.parametrize("body, content_type", [
    (b"garbage", "multipart/form-data; boundary=xyz"),
    (b"--xyz\r\n\r\n", "multipart/form-data"),
    (b"--xyz\r\nContent-Type: image/png\r\n\r\nabc", "multipart/form-data; boundary=xyz"),
    (b"--xyz\r\nno colon here\r\n\r\nx\r\n--xyz--\r\n", "multipart/form-data; boundary=xyz"),
    (b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\njust a field\r\n--xyz--\r\n',
     "multipart/form-data; boundary=xyz"),
    (b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="\xff.txt"\r\n\r\nx\r\n--xyz--\r\n',
     "multipart/form-data; boundary=xyz"),
    (b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="nul\0.txt"\r\n\r\nx\r\n--xyz--\r\n',
     "multipart/form-data; boundary=xyz"),
    (b'--xyz\r\nContent-Disposition: form-data; name="f"; filename=""\r\n\r\n\r\n--xyz--\r\n',
     "multipart/form-data; boundary=xyz"),  # what a browser sends for an empty file input
    (b'{"file": "x"}', "application/json"),
    (b"", "multipart/form-data; boundary=xyz"),
])
def test_upload_file_without_a_file_part_is_missing_field(ann, body, content_type):
    response = ann.post("/files", body, headers={"Content-Type": content_type}, status=400)
    assert error(response) == ("missing_field", "file")


def test_upload_file_empty_is_invalid(ann):
    assert error(upload_file(ann, b"", status=400)) == ("invalid_field", "file")


def test_upload_file_of_exactly_the_limit_and_one_byte_more(ann):
    limit = messenger.MAX_FILE_BYTES
    assert upload_file(ann, b"\1" * limit)["size"] == limit
    assert error(upload_file(ann, b"\1" * (limit + 1), status=413)) == ("payload_too_large", None)


def test_upload_file_limit_is_configurable(make_app):
    client = logged_in(make_app(max_file_bytes=1000), "ann@example.com")
    assert upload_file(client, b"x" * 1000)["size"] == 1000
    assert error(upload_file(client, b"x" * 1001, status=413)) == ("payload_too_large", None)
    assert error(upload_file(client, b"x" * 100_000, status=413)) == ("payload_too_large", None)


def test_upload_file_needs_a_session(api):
    assert error(upload_file(api, status=401)) == ("not_authorized", None)


def test_get_file_gives_its_bytes(ann):
    file = upload_file(ann, b"buy milk", "notes.txt", "text/plain")
    response = ann.get(file["url"])
    assert (response.status_int, response.body, response.content_type) == (200, b"buy milk", "text/plain")


def test_get_file_headers(ann):
    file = upload_file(ann, png_header(4, 4), "фото 1.png", "image/png")
    headers = ann.get(file["url"]).headers
    assert headers["Content-Disposition"] == (
        "inline; filename=\"____ 1.png\"; filename*=UTF-8''%D1%84%D0%BE%D1%82%D0%BE%201.png")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Security-Policy"] == messenger.PHOTO_HEADERS["Content-Security-Policy"]
    assert (headers["Accept-Ranges"], headers["Cache-Control"]) == ("bytes", "private")
    assert re.fullmatch(r'"[0-9a-f]{32}"', headers["ETag"])


@pytest.mark.parametrize("declared, data, served, disposition", [
    ("image/png", png_header(1, 1), "image/png", "inline"),
    ("text/html", b"<script>alert(1)</script>", "application/octet-stream", "attachment"),
    ("application/xhtml+xml", b"<html/>", "application/octet-stream", "attachment"),
    ("image/svg+xml", b"<svg onload='alert(1)'/>", "application/octet-stream", "attachment"),
    ("text/xml", b"<x/>", "application/octet-stream", "attachment"),
    ("application/xml", b"<x/>", "application/octet-stream", "attachment"),
    ("text/javascript", b"alert(1)", "application/octet-stream", "attachment"),
    ("application/javascript", b"alert(1)", "application/octet-stream", "attachment"),
    ("application/json", b"{}", "application/octet-stream", "attachment"),
    ("text/plain", b"hello", "text/plain", "attachment"),
    ("application/pdf", b"%PDF-1.4", "application/pdf", "attachment"),
    ("video/mp4", b"\0\0\0\x18ftypmp42", "video/mp4", "attachment"),
    ("audio/mpeg", b"ID3", "audio/mpeg", "attachment"),
    ("image/png", b"<html>not a png</html>", "image/png", "attachment"),
])
def test_get_file_serves_nothing_a_browser_would_run(ann, declared, data, served, disposition):
    response = ann.get(upload_file(ann, data, "x", declared)["url"])
    assert response.content_type == served
    assert response.headers["Content-Disposition"].startswith(disposition + ";")
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_get_file_etag_gives_304(ann):
    url = upload_file(ann)["url"]
    etag = ann.get(url).headers["ETag"]
    response = ann.get(url, headers={"If-None-Match": etag}, status=304)
    assert response.body == b"" and response.headers["ETag"] == etag


DIGITS = bytes(range(100))


@pytest.mark.parametrize("header, status, content_range, body", [
    ("bytes=0-9", 206, "bytes 0-9/100", DIGITS[:10]),
    ("bytes=10-", 206, "bytes 10-99/100", DIGITS[10:]),
    ("bytes=-5", 206, "bytes 95-99/100", DIGITS[95:]),
    ("bytes=90-200", 206, "bytes 90-99/100", DIGITS[90:]),
    ("bytes=-500", 206, "bytes 0-99/100", DIGITS),
    ("bytes=99-99", 206, "bytes 99-99/100", DIGITS[99:]),
    ("bytes=0-1,5-6", 200, None, DIGITS),  # several ranges: the whole file
    ("bytes=5-1", 200, None, DIGITS),
    ("items=0-1", 200, None, DIGITS),
    ("bytes=-", 200, None, DIGITS),
])
def test_get_file_range(ann, header, status, content_range, body):
    response = ann.get(upload_file(ann, DIGITS)["url"], headers={"Range": header}, status=status)
    assert (response.body, response.headers.get("Content-Range")) == (body, content_range)
    assert response.headers["Content-Length"] == str(len(body))


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=" + "9" * 5000 + "-"])
def test_get_file_range_past_the_end_is_416(ann, header):
    response = ann.get(upload_file(ann, DIGITS)["url"], headers={"Range": header}, status=416)
    assert error(response) == ("range_not_satisfiable", None)
    assert response.headers["Content-Range"] == "bytes */100"


def test_get_file_range_of_other_bytes_gives_the_whole_file(ann):
    url = upload_file(ann, DIGITS)["url"]
    etag = ann.get(url).headers["ETag"]
    assert ann.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}, status=206).body == DIGITS[:10]
    assert ann.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}, status=200).body == DIGITS


def test_get_file_of_many_chunks(ann):
    data = os.urandom(messenger.FILE_CHUNK_BYTES * 2 + 12345)
    url = upload_file(ann, data)["url"]
    assert ann.get(url).body == data
    start = messenger.FILE_CHUNK_BYTES - 10
    assert ann.get(url, headers={"Range": f"bytes={start}-"}, status=206).body == data[start:]


@pytest.mark.parametrize("file_id", ["0", "-1", "abc", "%EF%BC%91", "99999999999999999999"])
def test_get_file_bad_id_is_invalid_field(ann, file_id):
    assert error(ann.get(f"/files/{file_id}", status=400)) == ("invalid_field", "file_id")


def file_in_chat(sender, chat_id, data=b"hello"):
    """A file `sender` uploads and sends to a chat: (file, message)."""
    file = upload_file(sender, data)
    return file, sender.post_json(f"/chats/{chat_id}/messages", {"file_ids": [file["id"]]}).json


def test_get_file_to_the_members_of_a_chat_it_was_sent_to(ann, bob, chat):
    file, _ = file_in_chat(ann, chat["id"])
    assert bob.get(file["url"]).body == b"hello"


def test_get_file_to_a_stranger_is_what_a_missing_id_gets(ann, login, chat):
    file, _ = file_in_chat(ann, chat["id"])
    stranger = login()
    answer, missing = stranger.get(file["url"], status=400), stranger.get("/files/999", status=400)
    assert (answer.body, answer.headerlist) == (missing.body, missing.headerlist)
    assert error(answer) == ("file_not_found", None)


def test_get_file_unsent_only_to_its_uploader(ann, bob, chat):
    url = upload_file(ann)["url"]
    assert ann.get(url).body == b"hello"
    assert error(bob.get(url, status=400)) == ("file_not_found", None)


def test_get_file_lost_by_a_former_member(ann, bob, carol, group):
    file, _ = file_in_chat(ann, group["id"])
    assert carol.get(file["url"]).body == b"hello"
    ann.delete(f"/chats/{group['id']}/members/{carol.user['id']}")
    assert error(carol.get(file["url"], status=400)) == ("file_not_found", None)
    assert bob.get(file["url"]).body == b"hello"


def age_files(app, hours):
    """Make every file `hours` older."""
    with app.db.transaction() as conn:
        for file_id, created_at in conn.execute("SELECT id, created_at FROM files").fetchall():
            moment = datetime.datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()
            conn.execute("UPDATE files SET created_at = ? WHERE id = ?",
                         (messenger._iso(moment - hours * 3600), file_id))


def test_unsent_file_is_gone_after_a_day(app, ann, chat):
    file = upload_file(ann)
    age_files(app, 25)
    assert error(ann.get(file["url"], status=400)) == ("file_not_found", None)
    response = ann.post_json(f"/chats/{chat['id']}/messages", {"file_ids": [file["id"]]}, status=400)
    assert error(response) == ("file_not_found", "file_ids")
    app.feed.pruned_at = 0  # the next update prunes
    send(ann, chat["id"], "prune now")
    assert query(app, "SELECT count(*) FROM files") == [(0,)]
    assert query(app, "SELECT count(*) FROM file_contents") == [(0,)]


def test_unsent_file_is_kept_for_a_day(app, ann, chat):
    file = upload_file(ann)
    age_files(app, 23)
    app.feed.pruned_at = 0
    send(ann, chat["id"], "prune now")
    assert ann.get(file["url"]).body == b"hello"


def test_file_is_deleted_with_the_last_message_that_carries_it(app, ann, bob, chat, group):
    file, first = file_in_chat(ann, chat["id"])
    second = ann.post_json(f"/chats/{group['id']}/messages", {"file_ids": [file["id"]]}).json
    age_files(app, 48)
    ann.delete(f"/chats/{chat['id']}/messages/{first['id']}")
    assert bob.get(file["url"]).body == b"hello"  # the group's message still carries it
    ann.delete(f"/chats/{group['id']}/messages/{second['id']}")
    assert error(ann.get(file["url"], status=400)) == ("file_not_found", None)
    assert query(app, "SELECT count(*) FROM file_contents") == [(0,)]


def test_file_of_a_deleted_message_stays_the_uploaders_for_a_day(ann, bob, chat):
    file, message = file_in_chat(ann, chat["id"])
    ann.delete(f"/chats/{chat['id']}/messages/{message['id']}")
    assert error(bob.get(file["url"], status=400)) == ("file_not_found", None)
    assert ann.get(file["url"]).body == b"hello"


def test_old_file_carried_by_a_message_can_be_sent_again(app, ann, chat, group):
    file, _ = file_in_chat(ann, chat["id"])
    age_files(app, 48)
    again = ann.post_json(f"/chats/{group['id']}/messages", {"file_ids": [file["id"]]}).json
    assert [(f["id"], f["name"]) for f in again["files"]] == [(file["id"], "notes.txt")]


def test_send_message_with_files_and_no_text(ann, bob, chat):
    picture, notes = upload_file(ann, png_header(8, 6), "p.png"), upload_file(ann, b"text", "notes.txt")
    message = ann.post_json(f"/chats/{chat['id']}/messages", {"file_ids": [notes["id"], picture["id"]]}).json
    assert (message["text"], message["files"]) == ("", [notes, picture])
    assert bob.get(f"/chats/{chat['id']}/messages").json["messages"] == [message]
    assert bob.get(f"/chats/{chat['id']}").json["last_message"] == message
    assert updates(bob)[-1] == {"update_id": updates(bob)[-1]["update_id"], "type": "message",
                                "message": message}


@pytest.mark.parametrize("text", [None, ""])
def test_send_message_with_files_text_may_be_empty(ann, chat, text):
    file = upload_file(ann)
    body = {"text": text, "file_ids": [file["id"]]}
    assert ann.post_json(f"/chats/{chat['id']}/messages", body).json["text"] == ""


def test_send_message_with_text_and_files(ann, chat):
    file = upload_file(ann)
    message = ann.post_json(f"/chats/{chat['id']}/messages", {"text": "see", "file_ids": [file["id"]]}).json
    assert (message["text"], message["files"]) == ("see", [file])


@pytest.mark.parametrize("body, mnemonic, field", [
    ({"file_ids": []}, "missing_field", "text"),
    ({"file_ids": None, "text": ""}, "invalid_field", "text"),
    ({"file_ids": [1], "text": " "}, "invalid_field", "text"),
    ({"file_ids": "1"}, "invalid_field", "file_ids"),
    ({"file_ids": [1, 1]}, "invalid_field", "file_ids"),
    ({"file_ids": ["1"]}, "invalid_field", "file_ids"),
    ({"file_ids": [True]}, "invalid_field", "file_ids"),
    ({"file_ids": [0]}, "invalid_field", "file_ids"),
    ({"file_ids": [2**63]}, "invalid_field", "file_ids"),
    ({"file_ids": list(range(1, 12))}, "invalid_field", "file_ids"),
    ({"file_ids": [999]}, "file_not_found", "file_ids"),
    ({"file_ids": [1, 999]}, "file_not_found", "file_ids"),
])
def test_send_message_bad_files(ann, chat, body, mnemonic, field):
    upload_file(ann)
    response = ann.post_json(f"/chats/{chat['id']}/messages", body, status=400)
    assert error(response) == (mnemonic, field)


def test_send_message_of_ten_files(ann, chat):
    ids = [upload_file(ann, bytes([n]))["id"] for n in range(10)]
    message = ann.post_json(f"/chats/{chat['id']}/messages", {"file_ids": ids}).json
    assert [file["id"] for file in message["files"]] == ids


def test_send_message_with_someone_elses_file_is_not_found(ann, bob, chat):
    file = upload_file(bob)
    response = ann.post_json(f"/chats/{chat['id']}/messages", {"file_ids": [file["id"]]}, status=400)
    assert error(response) == ("file_not_found", "file_ids")


def test_send_message_with_a_file_received_is_not_found(ann, bob, chat):
    file, _ = file_in_chat(bob, chat["id"])
    response = ann.post_json(f"/chats/{chat['id']}/messages", {"file_ids": [file["id"]]}, status=400)
    assert error(response) == ("file_not_found", "file_ids")


def test_edit_message_with_files_may_empty_its_text(ann, chat):
    file = upload_file(ann)
    message = ann.post_json(f"/chats/{chat['id']}/messages",
                            {"text": "caption", "file_ids": [file["id"]]}).json
    edited = ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", {"text": ""}).json
    assert (edited["text"], edited["files"]) == ("", [file])


@pytest.mark.parametrize("body, mnemonic", [({"text": ""}, "invalid_field"), ({}, "missing_field")])
def test_edit_message_without_files_needs_text(ann, chat, body, mnemonic):
    message = send(ann, chat["id"], "hi")
    response = ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", body, status=400)
    assert error(response) == (mnemonic, "text")


def test_search_messages_finds_words_of_file_names(ann, bob, chat):
    file, message = file_in_chat(ann, chat["id"])
    report = upload_file(ann, b"%PDF", "Report-2026.final.pdf", "application/pdf")
    found = ann.post_json(f"/chats/{chat['id']}/messages",
                          {"text": "the numbers", "file_ids": [report["id"]]}).json
    for words in ("report", "2026", "pdf", "final", "numbers report"):
        assert bob.get("/messages", params={"query": words}).json["messages"] == [found], words
    assert search_texts(bob, "notes") == ([""], False)  # the first file's name, notes.txt


def test_search_messages_finds_file_names_of_edited_messages(ann, chat):
    file = upload_file(ann, filename="invoice.pdf")
    message = ann.post_json(f"/chats/{chat['id']}/messages", {"text": "one", "file_ids": [file["id"]]}).json
    assert search_texts(ann, "invoice") == (["one"], False)  # indexed now
    ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", {"text": "two"})
    assert search_texts(ann, "invoice") == (["two"], False)


# Replies


def test_send_reply(ann, bob, chat):
    first = send(ann, chat["id"], "question?")
    reply = bob.post_json(f"/chats/{chat['id']}/messages",
                          {"text": "answer", "reply_to_id": first["id"]}).json
    assert reply["reply_to_id"] == first["id"]
    assert ann.get(f"/chats/{chat['id']}/messages/{first['id']}").json == first


def test_reply_stays_when_its_message_is_deleted(ann, bob, chat):
    first = send(ann, chat["id"], "question?")
    reply = bob.post_json(f"/chats/{chat['id']}/messages",
                          {"text": "answer", "reply_to_id": first["id"]}).json
    ann.delete(f"/chats/{chat['id']}/messages/{first['id']}")
    assert bob.get(f"/chats/{chat['id']}/messages/{reply['id']}").json["reply_to_id"] == first["id"]
    response = bob.get(f"/chats/{chat['id']}/messages/{first['id']}", status=400)
    assert error(response) == ("message_not_found", None)


@pytest.mark.parametrize("reply_to_id, mnemonic", [
    ("other chat", "message_not_found"), (999, "message_not_found"), ("1", "invalid_field"),
    (0, "invalid_field"), (True, "invalid_field"),
])
def test_send_reply_bad_reply_to_id(ann, bob, chat, group, reply_to_id, mnemonic):
    if reply_to_id == "other chat":
        reply_to_id = send(ann, group["id"], "elsewhere")["id"]
    body = {"text": "answer", "reply_to_id": reply_to_id}
    response = ann.post_json(f"/chats/{chat['id']}/messages", body, status=400)
    assert error(response) == (mnemonic, "reply_to_id")


def test_get_message(ann, bob, chat):
    message = send(ann, chat["id"], "hello")
    assert bob.get(f"/chats/{chat['id']}/messages/{message['id']}").json == message


def test_get_message_of_another_chat_is_not_found(ann, chat, group):
    message = send(ann, group["id"], "hello")
    response = ann.get(f"/chats/{chat['id']}/messages/{message['id']}", status=400)
    assert error(response) == ("message_not_found", None)


def test_get_message_of_others_chat_is_not_found(ann, login, chat):
    message = send(ann, chat["id"], "hello")
    response = login().get(f"/chats/{chat['id']}/messages/{message['id']}", status=400)
    assert error(response) == ("chat_not_found", None)


@pytest.mark.parametrize("message_id", ["0", "x", "%EF%BC%91", "99999999999999999999"])
def test_get_message_bad_id(ann, chat, message_id):
    response = ann.get(f"/chats/{chat['id']}/messages/{message_id}", status=400)
    assert error(response) == ("invalid_field", "message_id")


# Safe retries (client_id)


def send_once(client, chat_id, client_id, text="hi", status=200, **fields):
    body = dict(fields, text=text, client_id=client_id)
    response = client.post_json(f"/chats/{chat_id}/messages", body, status=status)
    return response.json if status == 200 else response


def test_send_with_client_id_shows_it(ann, chat):
    assert send_once(ann, chat["id"], "a1-b2")["client_id"] == "a1-b2"


def test_send_retry_answers_the_first_message_and_sends_nothing(ann, bob, chat):
    first = send_once(ann, chat["id"], "tx-1")
    before = updates(bob)
    assert send_once(ann, chat["id"], "tx-1", text="changed on retry") == first
    assert updates(bob) == before
    assert page(ann, chat) == ([first["id"]], False)


def test_send_retry_answers_the_message_as_it_is_now(ann, chat):
    first = send_once(ann, chat["id"], "tx-1")
    edited = ann.put_json(f"/chats/{chat['id']}/messages/{first['id']}", {"text": "fixed"}).json
    assert send_once(ann, chat["id"], "tx-1") == edited


def test_send_retry_of_a_deleted_message_is_not_found(ann, chat):
    first = send_once(ann, chat["id"], "tx-1")
    ann.delete(f"/chats/{chat['id']}/messages/{first['id']}")
    assert error(send_once(ann, chat["id"], "tx-1", status=400)) == ("message_not_found", "client_id")


def test_send_client_id_is_per_author_and_chat(ann, bob, chat, group):
    ids = {send_once(ann, chat["id"], "same")["id"], send_once(bob, chat["id"], "same")["id"],
           send_once(ann, group["id"], "same")["id"]}
    assert len(ids) == 3


def test_send_client_id_a_day_later_is_a_new_send(app, ann, chat):
    first = send_once(ann, chat["id"], "tx-1")
    with app.db.transaction() as conn:
        conn.execute("UPDATE sends SET sent_at = sent_at - ?", (messenger.RETRY_SECONDS + 1,))
    again = send_once(ann, chat["id"], "tx-1")
    assert again["id"] != first["id"] and again["client_id"] == "tx-1"
    assert send_once(ann, chat["id"], "tx-1") == again


def test_send_retry_is_checked_like_any_send(ann, chat):
    send_once(ann, chat["id"], "tx-1")
    assert error(send_once(ann, chat["id"], "tx-1", text="", status=400)) == ("invalid_field", "text")


def test_send_retry_needs_no_file_or_reply_that_is_gone(app, ann, chat):
    first = send(ann, chat["id"], "question")
    file = upload_file(ann)
    sent = send_once(ann, chat["id"], "tx-1", file_ids=[file["id"]], reply_to_id=first["id"])
    ann.delete(f"/chats/{chat['id']}/messages/{first['id']}")
    assert send_once(ann, chat["id"], "tx-1", file_ids=[file["id"]], reply_to_id=first["id"]) == sent


@pytest.mark.parametrize("client_id", ["", "has space", "x" * 65, "ключ", "tab\t", 42, True, ["a"]])
def test_send_bad_client_id(ann, chat, client_id):
    assert error(send_once(ann, chat["id"], client_id, status=400)) == ("invalid_field", "client_id")


def test_send_longest_client_id(ann, chat):
    client_id = "".join(chr(c) for c in range(ord("!"), ord("~") + 1))[:64]
    assert send_once(ann, chat["id"], client_id)["client_id"] == client_id


# ---------------------------------------------------------------------------
# The real server: waitress on a free port, many threads at once
# ---------------------------------------------------------------------------


def messenger_command():
    """The `messenger` command as users run it, on this checkout's code: the installed
    console script when there is one (CI installs it), else `python messenger.py`."""
    script = shutil.which("messenger", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, messenger.__file__]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(messenger.__file__)))
    return command, env


def run_cli(*args, cwd=None):
    """Run the messenger command to its end: a CompletedProcess with text output."""
    command, env = messenger_command()
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=env)


def run_main(capsys, *args):
    """messenger.main(args) in this process, for a start that ends before it serves: its
    exit status and output, as run_cli gives them."""
    try:
        status = messenger.main(list(args))
    except SystemExit as exc:  # argparse's way out
        status = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


class Process:
    """The messenger command serving on a free port in its own process; its log is collected."""

    def __init__(self, *args):
        command, env = messenger_command()
        self.popen = subprocess.Popen([*command, "--port", "0", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
        self.stdout = []  # the lines printed before the start line, and the start line
        while not (self.stdout and " serving " in self.stdout[-1]):
            line = self.popen.stdout.readline()
            assert line, "".join(self.stdout) + self.popen.stderr.read()
            self.stdout.append(line)
        self.url = re.search(r"http://\S+?(?=/ )", self.stdout[-1])[0]
        self.log = []  # stderr, line by line
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self):
        for line in self.popen.stderr:
            self.log.append(line)

    def stop(self, signum=signal.SIGTERM):
        """Stop it with a signal: its exit status."""
        self.popen.send_signal(signum)
        try:
            return self.popen.wait(timeout=15)
        finally:
            self._reader.join(timeout=5)

    def kill(self):
        self.popen.kill()
        self.popen.wait(timeout=15)
        self._reader.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.popen.poll() is None:
            self.kill()


def call(url, method="GET", body=None, cookie=None):
    """One HTTP request; (status, JSON body, headers)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def at_once(count, action):
    """Run action(i) on `count` threads released together; their results in order."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(i):
        barrier.wait()
        results[i] = action(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.fixture
def server(tmp_path):
    with messenger.Server(db=str(tmp_path / "server.db"), password_iterations=ITERATIONS,
                          quiet=True) as server:
        yield server


def login_at(url, email, **fields):
    """Register and log in through a real server at url: (user id, cookie)."""
    call(url + "/users", "POST", dict(fields, email=email, password=PASSWORD))
    status, user, headers = call(url + "/login", "POST", {"email": email, "password": PASSWORD})
    return user["id"], headers["Set-Cookie"].split(";")[0]


def test_server_twenty_registrations_of_one_email(server):
    body = {"email": "race@example.com", "password": PASSWORD}
    results = at_once(20, lambda i: call(server.url + "/users", "POST", body)[:2])
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [400] * 19
    assert {body["error"] for status, body in results if status == 400} == {"email_taken"}


def test_server_both_members_open_one_dialog(server):
    ann_id, ann_cookie = login_at(server.url, "ann@example.com")
    bob_id, bob_cookie = login_at(server.url, "bob@example.com")
    pairs = [(bob_id, ann_cookie), (ann_id, bob_cookie)] * 4
    results = at_once(8, lambda i: call(server.url + "/chats", "POST", {"user_id": pairs[i][0]},
                                        pairs[i][1])[:2])
    assert {status for status, _ in results} == {200}
    assert len({chat["id"] for _, chat in results}) == 1


def group_of_three(server):
    """Ann's group with Bob on a real server, and Dave outside it: (ids, cookies, group id)."""
    (ann_id, ann), (bob_id, bob), (dave_id, dave) = (
        login_at(server.url, f"{name}@example.com") for name in ("ann", "bob", "dave"))
    group = call(server.url + "/chats", "POST", {"name": "Race", "member_ids": [bob_id]}, ann)[1]
    return (ann_id, bob_id, dave_id), (ann, bob, dave), group["id"]


def test_server_two_members_add_the_same_user_at_once(server):
    (_, _, dave_id), (ann, bob, _), group_id = group_of_three(server)
    results = at_once(2, lambda i: call(f"{server.url}/chats/{group_id}/members", "POST",
                                        {"user_id": dave_id}, (ann, bob)[i])[0])
    assert results == [200, 200]
    assert query(server.app, "SELECT count(*) FROM chat_members WHERE chat_id = ? AND user_id = ?",
                 group_id, dave_id) == [(1,)]


def test_server_owner_leaves_while_a_member_adds(server):
    (ann_id, bob_id, dave_id), (ann, bob, _), group_id = group_of_three(server)
    actions = [lambda: call(f"{server.url}/chats/{group_id}/members/{ann_id}", "DELETE", None, ann),
               lambda: call(f"{server.url}/chats/{group_id}/members", "POST", {"user_id": dave_id}, bob)]
    assert [result[0] for result in at_once(2, lambda i: actions[i]())] == [200, 200]
    group = call(f"{server.url}/chats/{group_id}", cookie=bob)[1]
    assert group["members"] == [bob_id, dave_id] and group["owner_id"] == bob_id


def test_database_settings(app):
    with app.db.connection() as conn:
        settings = [conn.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("journal_mode", "foreign_keys", "synchronous", "user_version")]
    assert settings == ["wal", 1, 1, messenger.SCHEMA_VERSION]  # synchronous 1 is NORMAL


def test_database_newer_than_the_code_is_refused(tmp_path):
    path = str(tmp_path / "future.db")
    sqlite3.connect(path).execute(f"PRAGMA user_version = {messenger.SCHEMA_VERSION + 1}").connection.close()
    with pytest.raises(sqlite3.DatabaseError, match="schema version"):
        messenger.make_app(path)


# A database as version 1 of messenger made it (schema.sql without its comments).
SCHEMA_V1 = """
CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    email         TEXT NOT NULL,
    email_key     TEXT NOT NULL UNIQUE,
    username      TEXT NOT NULL,
    username_key  TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL DEFAULT '',
    phone         TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at REAL NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE TABLE login_failures (
    email_key TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE INDEX login_failures_by_email ON login_failures (email_key, failed_at);
CREATE TABLE photos (
    user_id      INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    content_type TEXT NOT NULL,
    etag         TEXT NOT NULL,
    data         BLOB NOT NULL
);
CREATE TABLE chats (
    id              INTEGER PRIMARY KEY,
    user_low        INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    user_high       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at      TEXT NOT NULL,
    last_message_id INTEGER REFERENCES messages (id),
    opened_after    REAL NOT NULL,
    UNIQUE (user_low, user_high),
    CHECK (user_low < user_high)
);
CREATE TABLE chat_members (
    chat_id      INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    last_read_id INTEGER NOT NULL DEFAULT 0,
    unread_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id, user_id)
) WITHOUT ROWID;
CREATE INDEX chat_members_by_user ON chat_members (user_id, chat_id);
CREATE TABLE messages (
    id         INTEGER PRIMARY KEY,
    chat_id    INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    author_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    text       TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX messages_by_chat ON messages (chat_id, id);
CREATE TABLE updates (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    payload    TEXT NOT NULL
);
CREATE INDEX updates_by_user ON updates (user_id, id);
PRAGMA user_version = 1;
CREATE VIRTUAL TABLE users_search USING fts5 (
    username_key, content = 'users', content_rowid = 'id', tokenize = 'trigram case_sensitive 1'
);
CREATE TRIGGER users_search_insert AFTER INSERT ON users BEGIN
    INSERT INTO users_search (rowid, username_key) VALUES (new.id, new.username_key);
END;
CREATE TRIGGER users_search_delete AFTER DELETE ON users BEGIN
    INSERT INTO users_search (users_search, rowid, username_key)
    VALUES ('delete', old.id, old.username_key);
END;
CREATE TRIGGER users_search_update AFTER UPDATE OF username_key ON users BEGIN
    INSERT INTO users_search (users_search, rowid, username_key)
    VALUES ('delete', old.id, old.username_key);
    INSERT INTO users_search (rowid, username_key) VALUES (new.id, new.username_key);
END;
"""


def schema_shape(path):
    """What a schema is made of: its objects, and each table's columns."""
    conn = sqlite3.connect(path)
    try:
        objects = conn.execute("SELECT type, name FROM sqlite_master ORDER BY name").fetchall()
        return objects, {name: sorted(column[1:] for column in  # not its position
                                      conn.execute(f"PRAGMA table_xinfo('{name}')"))
                         for kind, name in objects if kind == "table"}
    finally:
        conn.close()


def test_database_of_version_1_is_upgraded(tmp_path):
    fresh, old = str(tmp_path / "fresh.db"), str(tmp_path / "old.db")
    messenger.make_app(fresh).db.close()
    conn = sqlite3.connect(old, isolation_level=None)
    conn.executescript(SCHEMA_V1)
    password_hash = messenger.hash_password(PASSWORD, ITERATIONS)
    conn.executemany(  # version 1 casefolded keys without NFC: this й is и and a breve
        "INSERT INTO users (email, email_key, username, username_key, password_hash, created_at)"
        " VALUES (?, ?, ?, ?, ?, '')",
        [("И\u0306@x.ru", "и\u0306@x.ru", "Пётр", "пётр", password_hash),
         ("b@x.ru", "b@x.ru", "b", "b", password_hash)])
    conn.execute("INSERT INTO chats (user_low, user_high, created_at, opened_after, last_message_id)"
                 " VALUES (1, 2, '', 0, 1)")
    conn.execute("INSERT INTO chat_members (chat_id, user_id) VALUES (1, 1), (1, 2)")
    conn.execute("INSERT INTO messages (chat_id, author_id, text, created_at) VALUES (1, 2, 'hi', 't')")
    conn.close()
    app = messenger.make_app(old, password_iterations=ITERATIONS)
    client = CheckedApp(app)
    client.post_json("/login", {"email": "й@x.ru", "password": PASSWORD})
    found = client.get("/users/" + urllib.parse.quote("етр")).json["users"]
    history = client.get("/chats/1/messages").json["messages"]
    found_messages = client.get("/messages", params={"query": "HI"}).json["messages"]
    app.db.close()
    assert found_messages == history
    assert [user["username"] for user in found] == ["Пётр"]
    assert history == [{"id": 1, "chat_id": 1, "author_id": 2, "text": "hi", "files": [], "reply_to_id": None,
                        "client_id": None, "created_at": "t", "edited_at": None, "reactions": {}}]
    assert query(app, "PRAGMA user_version") == [(messenger.SCHEMA_VERSION,)]
    assert schema_shape(old) == schema_shape(fresh)


def test_memory_database_from_eight_threads():
    with messenger.Server(db=":memory:", password_iterations=ITERATIONS, threads=8,
                          quiet=True) as server:
        users = [login_at(server.url, f"user{i}@example.com") for i in range(8)]
        hub_id, hub_cookie = users[0]
        chats = [call(server.url + "/chats", "POST", {"user_id": hub_id}, cookie)[1]["id"]
                 for _, cookie in users[1:]]

        def chatter(i):
            chat_id, (_, cookie) = chats[i % 7], users[1 + i % 7]
            return [call(server.url + f"/chats/{chat_id}/messages", "POST", {"text": f"{i}-{n}"},
                         cookie)[0] for n in range(10)]

        results = at_once(8, chatter)
        assert {status for statuses in results for status in statuses} == {200}
        listed = call(server.url + "/chats", cookie=hub_cookie)[1]["chats"]
        assert sum(chat["unread_count"] for chat in listed) == 80


def test_server_stop_closes_the_port(tmp_path):
    server = messenger.Server(db=str(tmp_path / "s.db"), quiet=True)
    assert call(server.url + "/nowhere")[0] == 404
    server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/", timeout=5)


@pytest.mark.parametrize("path, size", [
    ("/photos", messenger.MAX_PHOTO_BYTES + messenger.MULTIPART_OVERHEAD + 1),
    ("/photos", 6_000_000),  # a phone's photo as an avatar
    ("/files", messenger.MAX_FILE_BYTES + messenger.MULTIPART_OVERHEAD + 1),
    ("/chats", messenger.MAX_JSON_BYTES + 1),
])
def test_server_413_is_json_a_browser_can_read(server, path, size):
    _, cookie = login_at(server.url, "ann@example.com")
    status, headers, body = request_raw(server.url, "POST", path, b"x" * size, cookie,
                                        {"Content-Type": "multipart/form-data; boundary=x"})
    assert (status, json.loads(body)["error"]) == (413, "payload_too_large")
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_server_413_beyond_four_times_the_largest_upload_is_waitress_alone(server):
    limit = 4 * max(messenger.MAX_FILE_BYTES, messenger.MAX_PHOTO_BYTES)
    head = "POST /files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    answer = raw_request(server, f"{head}Content-Length: {limit + 1}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 413") and b"application/json" not in answer
    assert request_raw(server.url, "POST", "/files", b"x" * limit)[0] == 401  # reaches the app


def test_server_ten_sends_of_one_client_id_make_one_message(server):
    ann_id, ann = login_at(server.url, "ann@example.com")
    bob_id, bob = login_at(server.url, "bob@example.com")
    chat = call(server.url + "/chats", "POST", {"user_id": bob_id}, ann)[1]
    url = f"{server.url}/chats/{chat['id']}/messages"
    answers = at_once(10, lambda n: call(url, "POST", {"text": f"try {n}", "client_id": "c-1"}, ann))
    assert {status for status, _, _ in answers} == {200}
    assert len({json.dumps(message) for _, message, _ in answers}) == 1
    assert len(call(url, cookie=ann)[1]["messages"]) == 1
    for cookie in (ann, bob):
        feed = call(server.url + "/updates", cookie=cookie)[1]["updates"]
        assert [update["type"] for update in feed] == ["chat", "message"]


def test_server_file_of_ten_mib_round_trip_through_the_command(tmp_path):
    data = os.urandom(messenger.MAX_FILE_BYTES)
    with Process("--db", str(tmp_path / "files.db")) as process:
        _, cookie = login_at(process.url, "ann@example.com")
        body, headers = multipart("big.bin", data)
        status, _, body = request_raw(process.url, "POST", "/files", body, cookie, headers)
        file = json.loads(body)
        assert (status, file["size"]) == (200, len(data))
        status, headers, body = request_raw(process.url, "GET", file["url"], cookie=cookie)
        assert (status, headers["Content-Type"], body == data) == (200, "application/octet-stream", True)
        status, headers, body = request_raw(process.url, "GET", file["url"], cookie=cookie,
                                            headers={"Range": "bytes=-1000"})
        assert (status, body) == (206, data[-1000:])
        assert process.stop() == 0
    assert not [line for line in process.log if "Traceback" in line]


def test_server_path_not_utf8_is_invalid_field(server):
    _, cookie = login_at(server.url, "ann@example.com")
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.request("GET", "/users/%FF", headers={"Cookie": cookie})
    response = connection.getresponse()
    assert (response.status, response.getheader("Content-Type")) == (400, "application/json")
    assert json.loads(response.read())["error"] == "invalid_field"
    connection.close()


@pytest.fixture
def full_disk(monkeypatch):
    """disk["full"] = True makes every write transaction find the disk full (SQLITE_FULL)."""
    disk = {"full": False}
    transaction = messenger.Database.transaction

    @contextlib.contextmanager
    def limited(self):
        with transaction(self) as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0] if disk["full"] else 2**30
            conn.execute(f"PRAGMA max_page_count = {pages}")
            yield conn

    monkeypatch.setattr(messenger.Database, "transaction", limited)
    return disk


UNAVAILABLE = {"error": "unavailable", "message": "The database cannot be written now; try again soon."}


def test_full_disk_answers_503_and_nothing_is_lost(app, ann, bob, chat, full_disk):
    kept = send(ann, chat["id"], "kept")
    full_disk["full"] = True
    refused = [ann.post_json(f"/chats/{chat['id']}/messages", {"text": "x" * 4000}, status=503),
               ann.put_json(f"/chats/{chat['id']}/messages/{kept['id']}", {"text": "y" * 4000}, status=503)]
    history = ann.get(f"/chats/{chat['id']}/messages").json["messages"]
    full_disk["full"] = False
    sent = send(ann, chat["id"], "after")
    assert [(r.json, r.headers["Retry-After"]) for r in refused] == [(UNAVAILABLE, "5")] * 2
    assert history == [kept]
    assert ann.get(f"/chats/{chat['id']}/messages").json["messages"] == [kept, sent]


def test_deleted_database_answers_503_and_is_never_created_again(tmp_path):
    db = str(tmp_path / "gone.db")
    with Process("--db", db) as process:
        _, cookie = login_at(process.url, "ann@example.com")
        bob_id, _ = login_at(process.url, "bob@example.com")
        for suffix in ("", "-wal", "-shm"):
            os.remove(db + suffix)
        answers = [call(process.url + "/chats", "POST", {"user_id": bob_id}, cookie),
                   call(process.url + "/login", "POST", {"email": "ann@example.com", "password": PASSWORD}),
                   call(process.url + "/users", "POST", {"email": "c@example.com", "password": PASSWORD})]
        assert [(status, body) for status, body, _ in answers] == [(503, UNAVAILABLE)] * 3
        assert not os.path.exists(db)
        assert process.stop() == 0
    assert not any("Traceback" in line for line in process.log)


def test_replaced_database_answers_503(tmp_path, make_app):
    db = tmp_path / "replaced.db"
    app = make_app(str(db))
    client = logged_in(app, "ann@example.com")
    shutil.copy(db, tmp_path / "copy.db")
    os.replace(tmp_path / "copy.db", db)
    response = client.post_json("/chats", {"name": "Trip"}, status=503)
    assert response.json == UNAVAILABLE


# ---------------------------------------------------------------------------
# 6. Updates (long polling)
# ---------------------------------------------------------------------------


def test_updates_none_returns_at_once(ann):
    assert ann.get("/updates").json == {"updates": []}


def test_updates_new_chat_reaches_both_members(ann, bob, chat):
    [for_ann], [for_bob] = updates(ann), updates(bob)
    assert for_ann == {"update_id": for_ann["update_id"], "type": "chat", "chat": chat}
    assert for_bob["chat"] == bob.get(f"/chats/{chat['id']}").json


def test_updates_message_reaches_both_members(ann, bob, chat):
    message = send(ann, chat["id"], "hello")
    for client in (ann, bob):
        last = updates(client)[-1]
        assert last == {"update_id": last["update_id"], "type": "message", "message": message}


def test_updates_read_mark_reaches_the_other_member_and_the_reader(ann, bob, chat):
    message = send(ann, chat["id"], "hello")
    bob.post_json(f"/chats/{chat['id']}/read", {})
    event = {"type": "read", "chat_id": chat["id"], "user_id": bob.user["id"], "message_id": message["id"]}
    assert [dict(u, update_id=0) for u in updates(ann)[-1:] + updates(bob)[-1:]] == \
        [dict(event, update_id=0)] * 2


def test_updates_read_mark_that_does_not_move_is_no_update(ann, bob, chat):
    send(ann, chat["id"], "hello")
    bob.post_json(f"/chats/{chat['id']}/read", {})
    count = len(updates(ann))
    bob.post_json(f"/chats/{chat['id']}/read", {})
    assert len(updates(ann)) == count


def test_updates_only_the_callers(login, ann, chat):
    send(ann, chat["id"], "private")
    assert updates(login()) == []


def test_updates_offset_acknowledges(ann, bob, chat):
    send(ann, chat["id"], "one")
    first = updates(ann)
    send(ann, chat["id"], "two")
    after = updates(ann, offset=first[-1]["update_id"] + 1)
    assert [u["message"]["text"] for u in after] == ["two"]


def test_updates_limit_bounds_the_page(ann, bob, chat):
    for n in range(5):
        send(ann, chat["id"], str(n))
    page = updates(ann, limit=3)
    assert len(page) == 3 and page[0]["type"] == "chat"


@pytest.mark.parametrize("params, field", [
    ({"offset": -1}, "offset"), ({"offset": "x"}, "offset"), ({"timeout": 61}, "timeout"),
    ({"timeout": "1.5"}, "timeout"), ({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
])
def test_updates_bad_query(ann, params, field):
    assert error(ann.get("/updates", params=params, status=400)) == ("invalid_field", field)


def test_updates_older_than_retention_are_pruned(make_app):
    app = make_app(updates_hours=0.1 / 3600)
    ann, bob = logged_in(app, "ann@example.com"), logged_in(app, "bob@example.com")
    chat_id = ann.post_json("/chats", {"user_id": bob.user["id"]}).json["id"]
    send(ann, chat_id, "old")
    time.sleep(0.2)
    send(ann, chat_id, "new")
    assert [u["message"]["text"] for u in updates(ann)] == ["new"]
    assert query(app, "SELECT type, ref FROM updates") == [("message", 2)]  # "new", once for both members


def test_updates_show_the_message_as_it_is_now(ann, bob, chat):
    message = send(ann, chat["id"], "typo")
    edited = ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", {"text": "fixed"}).json
    assert [u["message"] for u in updates(bob) if u["type"].startswith("message")] == [edited, edited]


def test_updates_leave_out_a_deleted_messages_text(ann, bob, chat):
    message = send(ann, chat["id"], "secret")
    ann.put_json(f"/chats/{chat['id']}/messages/{message['id']}", {"text": "secret 2"})
    ann.delete(f"/chats/{chat['id']}/messages/{message['id']}")
    feed = updates(bob)
    assert "secret" not in json.dumps(feed)
    assert feed[-1] == {"update_id": feed[-1]["update_id"], "type": "message_deleted",
                        "chat_id": chat["id"], "message_id": message["id"]}


def test_updates_left_out_are_not_counted_in_the_limit(ann, bob, chat):
    offset = updates(bob)[-1]["update_id"] + 1
    doomed = [send(ann, chat["id"], f"m{n}") for n in range(3)]
    kept = send(ann, chat["id"], "kept")
    for message in doomed:
        ann.delete(f"/chats/{chat['id']}/messages/{message['id']}")
    assert updates(bob, offset=offset, limit=1)[0]["message"] == kept


def test_updates_of_a_profile_reach_whoever_shares_a_chat(ann, bob, login, chat):
    stranger = login()
    ann.put_json(f"/users/{ann.user['id']}", profile(ann, name="Ann Smith"))
    seen = [[u["user"] for u in updates(client) if u["type"] == "user"] for client in (ann, bob, stranger)]
    assert seen == [[dict(ann.user, name="Ann Smith")], [user_json(ann.user["id"], "", "ann", "Ann Smith")],
                    []]


def test_updates_of_an_unchanged_profile_are_none(ann, bob, chat):
    ann.put_json(f"/users/{ann.user['id']}", profile(ann))
    assert [u for u in updates(bob) if u["type"] == "user"] == []


def test_updates_of_an_avatar_reach_whoever_shares_a_chat(ann, bob, chat):
    upload(ann, PNG)
    ann.delete("/photos")
    assert [u["user"]["id"] for u in updates(bob) if u["type"] == "user"] == [ann.user["id"]] * 2


@pytest.mark.parametrize("size", [10, 100])
def test_updates_store_a_group_event_once_whatever_its_size(app, ann, size):
    group = ann.post_json("/chats", {"name": "Big", "member_ids": add_users(app, size - 1)}).json

    def database_bytes():
        return query(app, "PRAGMA page_count")[0][0] * query(app, "PRAGMA page_size")[0][0]

    before = database_bytes()
    for n in range(200):
        ann.put_json(f"/chats/{group['id']}", {"name": f"Big {n} " + "x" * 100})
    assert (database_bytes() - before) / 200 < 300
    assert query(app, "SELECT count(*) FROM updates WHERE type = 'chat'") == [(201,)]


class FeedReference:
    """The contract's feed, in Python: who gets which update, and how each shows when read."""

    def __init__(self):
        self.events = []  # (recipients, kind, key)
        self.members, self.messages, self.marks = {}, {}, {}

    def tell(self, recipients, kind, key):
        self.events.append((frozenset(recipients), kind, key))

    def feed(self, user):
        """What `user` reads now: (type, what it shows), in order."""
        shown = []
        for recipients, kind, key in self.events:
            if user not in recipients:
                continue
            if kind in ("message", "message_edited"):
                chat_id, message_id = key
                if message_id in self.messages and user in self.members.get(chat_id, ()):
                    shown.append((kind, message_id, self.messages[message_id][1]))
            elif kind == "chat":
                if user in self.members.get(key, ()):
                    shown.append((kind, key))
            else:
                shown.append((kind, key))
        return shown


def shown(update):
    """An update as FeedReference.feed() writes it."""
    kind = update["type"]
    if kind in ("message", "message_edited"):
        return kind, update["message"]["id"], update["message"]["text"]
    if kind == "chat":
        return kind, update["chat"]["id"]
    return kind, tuple(sorted((k, v) for k, v in update.items() if k not in ("update_id", "type")))


def whole_feed(client):
    """A user's whole feed, three updates a page; the ids must grow."""
    feed, offset = [], 0
    while page := updates(client, offset=offset, limit=3):
        feed += page
        offset = page[-1]["update_id"] + 1
    ids = [update["update_id"] for update in feed]
    assert ids == sorted(set(ids))
    return [shown(update) for update in feed]


def test_updates_follow_membership_spans_like_a_reference(app):
    rng = random.Random(18)
    users = [logged_in(app, f"span{n}@example.com") for n in range(10)]
    ids = [client.user["id"] for client in users]
    client_of = dict(zip(ids, users))
    ref = FeedReference()
    groups = []
    for n in range(5):
        members = {ids[0], *rng.sample(ids[1:], 3)}
        chat = users[0].post_json("/chats", {"name": f"G{n}", "member_ids": sorted(members - {ids[0]})}).json
        groups.append(chat["id"])
        ref.members[chat["id"]] = members
        ref.tell(members, "chat", chat["id"])
        ref.marks.update({(user, chat["id"]): 0 for user in members})
    for _ in range(300):
        chat_id = rng.choice(groups)
        members = ref.members[chat_id]
        actor = rng.choice(sorted(members))
        client = client_of[actor]
        mine = [m for m, (chat, _, author) in ref.messages.items() if chat == chat_id and author == actor]
        action = rng.choice(["join", "join", "leave", "send", "send", "send", "edit", "react", "delete",
                             "read", "rename"])
        if action == "join" and len(members) < len(ids):
            joiner = rng.choice(sorted(set(ids) - members))
            client.post_json(f"/chats/{chat_id}/members", {"user_id": joiner})
            members.add(joiner)
            last = max([m for m, (chat, _, _) in ref.messages.items() if chat == chat_id], default=0)
            ref.marks[joiner, chat_id] = last
            ref.tell(members, "chat", chat_id)
        elif action == "leave" and len(members) > 2:
            client.delete(f"/chats/{chat_id}/members/{actor}")
            members.discard(actor)
            ref.tell({actor}, "chat_removed", (("chat_id", chat_id),))
            ref.tell(members, "chat", chat_id)
        elif action == "send":
            text = f"message {len(ref.messages)}"
            message = send(client, chat_id, text)
            ref.messages[message["id"]] = (chat_id, text, actor)
            ref.marks[actor, chat_id] = message["id"]
            ref.tell(members, "message", (chat_id, message["id"]))
        elif action == "edit" and mine:
            message_id = rng.choice(mine)
            text = f"edited {rng.random()}"
            client.put_json(f"/chats/{chat_id}/messages/{message_id}", {"text": text})
            ref.messages[message_id] = (chat_id, text, actor)
            ref.tell(members, "message_edited", (chat_id, message_id))
        elif action == "react" and mine:
            message_id, emoji = rng.choice(mine), rng.choice("👍🎉")
            before = client.get(f"/chats/{chat_id}/messages/{message_id}").json["reactions"]
            client.put_json(f"/chats/{chat_id}/messages/{message_id}/reaction", {"emoji": emoji})
            if actor not in before.get(emoji, []):
                ref.tell(members, "reaction", (("chat_id", chat_id), ("emoji", emoji),
                                               ("message_id", message_id), ("user_id", actor)))
        elif action == "delete" and mine:
            message_id = rng.choice(mine)
            client.delete(f"/chats/{chat_id}/messages/{message_id}")
            del ref.messages[message_id]
            ref.tell(members, "message_deleted", (("chat_id", chat_id), ("message_id", message_id)))
        elif action == "read":
            last = max([m for m, (chat, _, _) in ref.messages.items() if chat == chat_id], default=0)
            client.post_json(f"/chats/{chat_id}/read", {})
            if last > ref.marks[actor, chat_id]:
                ref.marks[actor, chat_id] = last
                ref.tell({actor}, "read", (("chat_id", chat_id), ("message_id", last), ("user_id", actor)))
        elif action == "rename":
            client.put_json(f"/chats/{chat_id}", {"name": f"renamed {rng.random()}"})
            ref.tell(members, "chat", chat_id)
    assert sum(len(ref.feed(user)) for user in ids) > 500  # enough happened
    for user in ids:
        assert whole_feed(client_of[user]) == ref.feed(user), user


def test_updates_of_a_rejoining_member_skip_what_happened_while_away(ann, bob, carol, group):
    send(ann, group["id"], "before")
    ann.delete(f"/chats/{group['id']}/members/{carol.user['id']}")
    send(ann, group["id"], "while away")
    ann.post_json(f"/chats/{group['id']}/members", {"user_id": carol.user["id"]})
    send(ann, group["id"], "after")
    texts = [u["message"]["text"] for u in updates(carol) if u["type"] == "message"]
    assert texts == ["before", "after"]
    assert [u["type"] for u in updates(carol)] == ["chat", "message", "chat_removed", "chat", "message"]


def test_updates_of_a_late_member_start_when_they_joined(ann, bob, login, group):
    send(ann, group["id"], "before")
    dan = login()
    ann.post_json(f"/chats/{group['id']}/members", {"user_id": dan.user["id"]})
    send(ann, group["id"], "after")
    assert [(u["type"], u.get("message", {}).get("text")) for u in updates(dan)] == [
        ("chat", None), ("message", "after")]


def test_updates_timeout_returns_empty_after_waiting(ann):
    started = time.monotonic()
    assert updates(ann, timeout=1) == []
    assert time.monotonic() - started >= 0.9


def wait_until(condition, seconds=10):
    """Whether condition() became true within `seconds` (checked every 10 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def poll(server, cookie, **params):
    query = urllib.parse.urlencode(params)
    return call(f"{server.url}/updates?{query}", cookie=cookie)[1]["updates"]


def two_in_a_chat(server):
    """Log in two users on a server and open their chat: (ann cookie, bob cookie, chat id, offset)."""
    _, ann_cookie = login_at(server.url, "ann@example.com")
    bob_id, bob_cookie = login_at(server.url, "bob@example.com")
    chat_id = call(server.url + "/chats", "POST", {"user_id": bob_id}, ann_cookie)[1]["id"]
    offset = poll(server, ann_cookie)[-1]["update_id"] + 1
    return ann_cookie, bob_cookie, chat_id, offset


def wake_up_seconds(server, waiter_cookie, sender_url, sender_cookie, chat_id, offset):
    """Seconds from a message posted through sender_url to the waiting poll returning it."""
    result = {}

    def wait():
        result["updates"] = poll(server, waiter_cookie, offset=offset, timeout=20)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)  # let the poll start waiting
    sent = time.monotonic()
    message = call(f"{sender_url}/chats/{chat_id}/messages", "POST", {"text": "wake"},
                   sender_cookie)[1]
    thread.join()
    assert [u["message"] for u in result["updates"]] == [message]
    return result["at"] - sent, result["updates"][-1]["update_id"] + 1


def test_server_poll_wakes_when_a_message_arrives(server):
    ann_cookie, bob_cookie, chat_id, offset = two_in_a_chat(server)
    delays = []
    for _ in range(20):
        delay, offset = wake_up_seconds(server, ann_cookie, server.url, bob_cookie, chat_id, offset)
        delays.append(delay)
    # The goal is about 100 ms; the bound is loose so a busy machine does not fail it.
    assert statistics.median(delays) < 1.0


def test_server_send_wakes_only_its_recipients(server, monkeypatch):
    ann_cookie, bob_cookie, chat_id, _ = two_in_a_chat(server)
    carol_id, carol = login_at(server.url, "carol@example.com")
    reads = collections.Counter()
    read = server.app.feed.read
    monkeypatch.setattr(server.app.feed, "read", lambda db, user, *rest: (reads.update([user]),
                                                                         read(db, user, *rest))[1])
    waiting = threading.Thread(target=poll, args=(server, carol), kwargs={"offset": 10**9, "timeout": 2})
    waiting.start()
    assert wait_until(lambda: server.app.feed.waiting == 1)
    for n in range(40):
        call(f"{server.url}/chats/{chat_id}/messages", "POST", {"text": f"not for carol {n}"}, ann_cookie)
    waiting.join()
    # Carol's poll read when it began and at each quarter-second recheck, never for a send.
    assert reads[carol_id] <= 2 / messenger.POLL_RECHECK_SECONDS + 2


def test_server_poll_wakes_for_a_message_from_another_process(tmp_path, server):
    ann_cookie, bob_cookie, chat_id, offset = two_in_a_chat(server)
    with Process("--db", server.app.db.path, "--quiet") as process:
        delay, _ = wake_up_seconds(server, ann_cookie, process.url, bob_cookie, chat_id, offset)
    assert delay < 2.0  # about POLL_RECHECK_SECONDS


def test_server_long_polls_do_not_starve_other_requests(tmp_path):
    with messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, threads=4,
                          quiet=True) as server:
        _, cookie = login_at(server.url, "ann@example.com")
        pollers = [threading.Thread(target=poll, args=(server, cookie), kwargs={"timeout": 60})
                   for _ in range(10)]
        for thread in pollers:
            thread.start()
        assert wait_until(lambda: server.app.feed.waiting == server.app.feed.max_waiting == 2)
        # The other eight answered at once (none is still queued when the server stops).
        assert wait_until(lambda: sum(thread.is_alive() for thread in pollers) == 2)
        assert wait_until(lambda: server.app.db.borrowed == 0)  # a waiting poll holds no connection
        started = time.monotonic()
        assert call(server.url + "/users", cookie=cookie)[0] == 200
        assert time.monotonic() - started < 2.0  # answered while the polls still wait
        assert server.app.feed.waiting == 2
    for thread in pollers:  # stopping the server ended the waiting polls
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.mark.parametrize("threads, waiting", [(1, 0), (2, 1), (3, 1), (4, 2), (8, 6), (16, 12)])
def test_long_polls_leave_threads_free(make_app, threads, waiting):
    assert make_app(":memory:", threads=threads).feed.max_waiting == waiting


def test_updates_answer_at_once_when_no_thread_may_wait(ann):
    ann.app.feed.max_waiting = 0
    started = time.monotonic()
    assert updates(ann, timeout=30) == []
    assert time.monotonic() - started < 10


def test_server_stop_ends_waiting_polls(tmp_path):
    server = messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, quiet=True)
    _, cookie = login_at(server.url, "ann@example.com")
    answers = []
    thread = threading.Thread(target=lambda: answers.append(poll(server, cookie, timeout=60)))
    thread.start()
    assert wait_until(lambda: server.app.feed.waiting == 1)
    started = time.monotonic()
    server.stop()
    thread.join(timeout=10)
    assert answers == [[]] and time.monotonic() - started < 5


def read_stream(server, cookie, until=None, headers=(), path="/updates/stream"):
    """Open an event stream on a real server: (its response, its text up to its end, or up to
    where until(text) is true)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=15)
    connection.request("GET", path, headers=dict(headers, Cookie=cookie))
    response, text = connection.getresponse(), ""
    while not (until and until(text)):
        line = response.readline()
        if not line:
            break
        text += line.decode()
    connection.close()
    return response, text


def events(text):
    """The events of a stream's text, as (id, type, update)."""
    return [(int(id_), kind, json.loads(data)) for id_, kind, data in
            re.findall(r"^id: (\d+)\nevent: (\w+)\ndata: (.*)\n\n", text, re.M)]


@pytest.fixture
def stream_server(tmp_path):
    """A server whose event streams end after 0.6 s, with a comment every 0.1 s when quiet."""
    with messenger.Server(db=str(tmp_path / "stream.db"), password_iterations=ITERATIONS, quiet=True,
                          stream_seconds=0.6, stream_heartbeat_seconds=0.1) as server:
        yield server


def test_stream_frames_each_update(stream_server):
    ann_cookie, bob_cookie, chat_id, offset = two_in_a_chat(stream_server)
    message = call(f"{stream_server.url}/chats/{chat_id}/messages", "POST", {"text": "hi"}, bob_cookie)[1]
    response, text = read_stream(stream_server, ann_cookie, headers={"Last-Event-ID": str(offset - 1)},
                                 until=lambda text: events(text))
    update_id = poll(stream_server, ann_cookie, offset=offset)[0]["update_id"]
    update = {"update_id": update_id, "type": "message", "message": message}
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    data = json.dumps(update, ensure_ascii=False, separators=(",", ":"))
    assert text.startswith(f"retry: 1000\n\nid: {update_id}\nevent: message\ndata: {data}\n\n")


def test_stream_sends_a_comment_when_quiet_and_ends_in_time(stream_server):
    ann_cookie, _, _, offset = two_in_a_chat(stream_server)
    started = time.monotonic()
    _, text = read_stream(stream_server, ann_cookie, headers={"Last-Event-ID": str(offset - 1)})
    assert 0.55 < time.monotonic() - started < 10
    assert text.count(": still here\n\n") >= 3 and events(text) == []


def test_stream_resumes_after_last_event_id_losing_nothing(stream_server):
    ann_cookie, bob_cookie, chat_id, _ = two_in_a_chat(stream_server)
    url = f"{stream_server.url}/chats/{chat_id}/messages"
    call(url, "POST", {"text": "one"}, bob_cookie)
    _, first = read_stream(stream_server, ann_cookie)  # ends by itself after 0.6 s
    call(url, "POST", {"text": "two"}, bob_cookie)  # while no stream is open
    last_id = events(first)[-1][0]
    _, second = read_stream(stream_server, ann_cookie, headers={"Last-Event-ID": str(last_id)},
                            until=lambda text: any(kind == "message" for _, kind, _ in events(text)))
    received = events(first) + events(second)
    assert [update["message"]["text"] for _, kind, update in received if kind == "message"] == ["one", "two"]
    assert len({id_ for id_, _, _ in received}) == len(received)  # none repeated
    assert all(id_ == update["update_id"] for id_, _, update in received)


def test_stream_starts_at_the_offset(stream_server):
    ann_cookie, bob_cookie, chat_id, offset = two_in_a_chat(stream_server)
    call(f"{stream_server.url}/chats/{chat_id}/messages", "POST", {"text": "new"}, bob_cookie)
    _, text = read_stream(stream_server, ann_cookie, path=f"/updates/stream?offset={offset}",
                          until=lambda text: events(text))
    assert [update for _, _, update in events(text)] == poll(stream_server, ann_cookie, offset=offset)


def test_stream_head_holds_no_stream_open(make_app):
    client = logged_in(make_app(stream_seconds=3600), "ann@example.com")
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(head=client.head("/updates/stream")), daemon=True)
    thread.start()
    thread.join(30)  # a stream would last an hour
    assert answer["head"].content_type == "text/event-stream" and answer["head"].body == b""


@pytest.mark.parametrize("header", ["abc", "-1", "\xff", str(2**63)])
def test_stream_bad_last_event_id(ann, header):
    response = ann.get("/updates/stream", headers={"Last-Event-ID": header}, status=400)
    assert error(response) == ("invalid_field", "Last-Event-ID")


def test_stream_allows_a_browser_with_credentials(stream_server):
    ann_cookie, _, _, _ = two_in_a_chat(stream_server)
    response, _ = read_stream(stream_server, ann_cookie, until=lambda text: "retry" in text,
                              headers={"Origin": "http://localhost:5173"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"


def test_server_streams_do_not_starve_other_requests(tmp_path):
    with messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, threads=4,
                          quiet=True) as server:
        _, cookie = login_at(server.url, "ann@example.com")
        streams = []
        for _ in range(10):
            connection = http.client.HTTPConnection(server.host, server.port, timeout=15)
            connection.request("GET", "/updates/stream", headers={"Cookie": cookie})
            streams.append(connection)
        answers = [connection.getresponse() for connection in streams]
        started = time.monotonic()
        status = call(server.url + "/users", cookie=cookie)[0]
        elapsed = time.monotonic() - started
    # Stopping the server ended the streams that could wait: two of the four threads.
    texts = [answer.read().decode() for answer in answers]
    for connection in streams:
        connection.close()
    assert (status, elapsed < 5) == (200, True)
    assert sum(text.endswith("retry: 5000\n\n") for text in texts) == 8


def test_server_stop_ends_open_streams(tmp_path):
    server = messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, quiet=True)
    _, cookie = login_at(server.url, "ann@example.com")
    connection = http.client.HTTPConnection(server.host, server.port, timeout=15)
    connection.request("GET", "/updates/stream", headers={"Cookie": cookie})
    answer = connection.getresponse()
    answer.readline()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < messenger.STOP_GRACE_SECONDS + 2
    connection.close()


def test_server_one_user_waits_at_most_four_times(tmp_path):
    with messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, quiet=True,
                          threads=16) as server:
        ann_id, ann = login_at(server.url, "ann@example.com")
        _, bob = login_at(server.url, "bob@example.com")
        future = 10**6  # an offset with no updates yet: every poll waits
        waiting = [threading.Thread(target=poll, args=(server, ann), kwargs={"offset": future, "timeout": 3})
                   for _ in range(4)]
        for thread in waiting:
            thread.start()
        assert wait_until(lambda: server.app.feed.waiting_of[ann_id] == 4)
        started = time.monotonic()
        poll(server, ann, offset=future, timeout=3)
        fifth = time.monotonic() - started
        _, text = read_stream(server, ann, path=f"/updates/stream?offset={future}")
        started = time.monotonic()
        poll(server, bob, offset=future, timeout=1)
        other = time.monotonic() - started
        for thread in waiting:
            thread.join()
    assert fifth < 1 and f"retry: {messenger.STREAM_BUSY_RETRY_MS}" in text and other >= 0.9


def test_server_stream_ends_when_its_session_does(tmp_path):
    with messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, quiet=True) as server:
        _, cookie = login_at(server.url, "ann@example.com")
        bob_id, bob = login_at(server.url, "bob@example.com")
        chat_id = call(server.url + "/chats", "POST", {"user_id": bob_id}, cookie)[1]["id"]
        result = {}

        def read():
            result["text"] = read_stream(server, cookie)[1]
            result["ended"] = time.monotonic()

        thread = threading.Thread(target=read)
        thread.start()
        assert wait_until(lambda: server.app.feed.waiting == 1)
        call(server.url + "/logout", "DELETE", cookie=cookie)
        logged_out = time.monotonic()
        call(f"{server.url}/chats/{chat_id}/messages", "POST", {"text": "after logout"}, bob)
        thread.join()
    assert result["ended"] - logged_out < 1 and "after logout" not in result["text"]


def test_server_head_of_a_long_poll_answers_at_once(server):
    _, cookie = login_at(server.url, "ann@example.com")
    connection = http.client.HTTPConnection(server.host, server.port, timeout=15)
    started = time.monotonic()
    connection.request("HEAD", "/updates?timeout=60", headers={"Cookie": cookie})
    assert connection.getresponse().status == 200 and time.monotonic() - started < 1
    connection.close()


# ---------------------------------------------------------------------------
# 7. Running and embedding
# ---------------------------------------------------------------------------


def test_index_is_html_listing_every_route(app, api):
    response = api.get("/")
    assert response.content_type == "text/html"
    for route in app.routes:
        path = html.escape(messenger._route_path(route.rule))
        assert f"<td>{route.method}</td><td><code>{path}</code></td>" in response.text


def test_openapi_describes_every_route_and_nothing_else(make_app):
    app = make_app(test_routes=True)
    doc = CheckedApp(app).get("/openapi.json").json
    described = {(method.upper(), path) for path, operations in doc["paths"].items() for method in operations}
    assert described == {(r.method, messenger._route_path(r.rule)) for r in app.routes
                         if not r.rule.startswith("/__")}


def all_refs(value):
    if isinstance(value, dict):
        return ([value["$ref"]] if "$ref" in value else []) + [r for v in value.values() for r in all_refs(v)]
    return [r for v in value for r in all_refs(v)] if isinstance(value, list) else []


def test_openapi_is_valid_in_its_structure(api):
    doc = api.get("/openapi.json").json
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] and doc["info"]["version"]
    refs = all_refs(doc)
    assert refs and all(ref.rsplit("/", 1)[1] in doc["components"]["schemas"] for ref in refs)
    assert doc["components"]["securitySchemes"]["session"] == {
        "type": "apiKey", "in": "cookie", "name": "session_id", "description": "The cookie POST /login sets."}
    operations = [op for path in doc["paths"].values() for op in path.values()]
    assert len({op["operationId"] for op in operations}) == len(operations)
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert op["summary"] and op["responses"]["200"]["content"], (method, path)
            assert all(answer["description"] for answer in op["responses"].values())
            names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert names == set(re.findall(r"\{(\w+)\}", path)), (method, path)


def test_openapi_marks_the_public_routes(api):
    doc = api.get("/openapi.json").json
    public = {(method.upper(), path) for path, ops in doc["paths"].items() for method, op in ops.items()
              if op.get("security") == []}
    assert public == {("POST", "/users"), ("POST", "/sign_up"), ("POST", "/login"), ("GET", "/"),
                      ("GET", "/openapi.json")}


def test_openapi_names_the_address_asked(api):
    doc = api.get("/openapi.json", headers={"Host": "chat.example:8443"}).json
    assert doc["servers"] == [{"url": "http://chat.example:8443"}]


def test_openapi_lists_the_errors_a_route_gives(api):
    paths = api.get("/openapi.json").json["paths"]
    responses = paths["/chats/{chat_id}/messages/{message_id}"]["put"]["responses"]
    assert {status: answer["description"] for status, answer in responses.items() if status != "200"} == {
        "400": "chat_not_found, invalid_field, invalid_json, message_not_found, missing_field",
        "401": "not_authorized", "403": "forbidden", "413": "payload_too_large", "500": "internal_error",
        "503": "unavailable"}


def test_openapi_describes_file_downloads_as_bytes_with_their_answers(api):
    paths = api.get("/openapi.json").json["paths"]
    download = paths["/files/{file_id}"]["get"]
    assert sorted(download["responses"]) == ["200", "206", "304", "400", "401", "416", "500", "503"]
    assert download["responses"]["200"]["content"] == {"*/*": {"schema": messenger.BINARY}}
    assert download["responses"]["416"]["description"] == "range_not_satisfiable"
    assert {p["name"] for p in download["parameters"] if p["in"] == "header"} == {"Range", "If-None-Match",
                                                                                  "If-Range"}
    upload = paths["/files"]["post"]["requestBody"]["content"]
    assert list(upload) == ["multipart/form-data"]
    assert paths["/photos/{user_id}"]["get"]["responses"]["304"]


def test_openapi_describes_the_send_fields(api):
    doc = api.get("/openapi.json").json
    body = doc["paths"]["/chats/{chat_id}/messages"]["post"]["requestBody"]["content"]["application/json"]
    fields = body["schema"]["properties"]
    assert set(fields) == {"text", "file_ids", "reply_to_id", "client_id"}
    assert not schema_errors(fields["client_id"], "a-1", doc)
    assert schema_errors(fields["client_id"], "a 1", doc)
    assert schema_errors(fields["file_ids"], list(range(1, 12)), doc)


@pytest.mark.parametrize("path, method, field", [("/chats", "post", "member_ids"),
                                                ("/chats/{chat_id}/read", "post", "message_id"),
                                                ("/users/{user}", "put", "password"),
                                                ("/users", "post", "username")])
def test_openapi_accepts_null_where_the_server_does(api, path, method, field):
    doc = api.get("/openapi.json").json
    schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    bodies = schema.get("oneOf", [schema])
    assert any(field in body["properties"] and not schema_errors(body["properties"][field], None, doc)
               for body in bodies)


def test_answer_checker_finds_an_answer_off_its_description(app):
    doc = messenger.openapi_document(app, "http://localhost")
    message = {"id": 1, "chat_id": 1, "author_id": 1, "text": "hi", "files": [], "reply_to_id": None,
               "client_id": None, "created_at": "t", "edited_at": None, "reactions": {}}
    assert schema_errors(messenger._ref("Message"), message, doc) == []
    assert schema_errors(messenger._ref("Message"), dict(message, extra=1), doc) == [
        "$: 'extra' is not in the description"]
    assert schema_errors(messenger._ref("Message"), dict(message, id=0), doc) == ["$.id: 0 out of range"]


def test_index_links_to_the_api_description(api):
    assert 'href="/openapi.json"' in api.get("/").text
    assert api.get("/", headers={"Accept": "application/json"}).json["api"] == "/openapi.json"


def test_readme_documents_every_route_and_no_other(make_app):
    with open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    # `GET /updates?offset=0` is a route; `GET /chats 200 1.3 ms`, a log line, is not.
    mentioned = re.findall(r"`(GET|POST|PUT|DELETE) (/[^`\s?]*)(?:\?[^`\s]*)?`", readme)
    documented = {(method, re.sub(r"\{\w+\}", "{}", path)) for method, path in mentioned}
    served = {(r.method, re.sub(r"<\w+>", "{}", r.rule)) for r in make_app(test_routes=True).routes}
    assert documented == served


def test_index_is_json_when_asked(app, api):
    response = api.get("/", headers={"Accept": "text/html;q=0.5, application/json"})
    assert response.json["name"] == "messenger" and response.json["version"] == messenger.__version__
    listed = {(r["method"], r["path"]) for r in response.json["routes"]}
    assert listed == {(route.method, messenger._route_path(route.rule)) for route in app.routes}
    assert all(r["description"] for r in response.json["routes"])


def test_index_browser_accept_gets_html(api):
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    assert api.get("/", headers={"Accept": accept}).content_type == "text/html"


def test_make_app_returns_independent_apps(make_app):
    first = CheckedApp(make_app(":memory:"))
    second = CheckedApp(make_app(":memory:"))
    body = {"email": "ann@example.com", "password": PASSWORD}
    assert first.post_json("/users", body).json == second.post_json("/users", body).json


def test_two_servers_share_nothing():
    with messenger.Server(password_iterations=ITERATIONS, quiet=True) as one, \
            messenger.Server(password_iterations=ITERATIONS, quiet=True) as two:
        assert one.port != two.port
        login_at(one.url, "ann@example.com")
        status, body, _ = call(two.url + "/login", "POST", {"email": "ann@example.com",
                                                            "password": PASSWORD})
        assert (status, body["error"]) == (400, "wrong_credentials")


def test_waitress_internals_are_where_messenger_expects():
    with messenger.Server(quiet=True) as server, \
            socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(1)
        waitress_server = server._server
        channels = [c for c in getattr(waitress_server, "_map", {}).values()
                    if isinstance(c, waitress.channel.HTTPChannel)]
        parts = {
            "server._map": hasattr(waitress_server, "_map"),
            "server.task_dispatcher.shutdown": hasattr(getattr(waitress_server, "task_dispatcher", None),
                                                       "shutdown"),
            "waitress.wasyncore.loop": hasattr(waitress.wasyncore, "loop"),
            "waitress.wasyncore.dispatcher.close": hasattr(waitress.wasyncore.dispatcher, "close"),
            "HTTPChannel.total_outbufs_len": bool(channels) and all(
                hasattr(c, "total_outbufs_len") for c in channels),
            "HTTPChannel.handle_close": bool(channels) and all(hasattr(c, "handle_close") for c in channels),
        }
    moved = [name for name, there in parts.items() if not there]
    assert not moved, (f"waitress {importlib.metadata.version('waitress')} has moved {moved}:"
                       " messenger._WaitressInternals must follow, and pyproject.toml's cap with it")


def test_server_url_and_port():
    with messenger.Server(quiet=True) as server:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
        assert call(server.url + "/nowhere")[0] == 404


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_make_app_runs_under_another_wsgi_server(app):
    httpd = wsgiref.simple_server.make_server("127.0.0.1", 0, app,
                                              handler_class=QuietHandler)
    thread = threading.Thread(target=httpd.handle_request)
    thread.start()
    status, body, _ = call(f"http://127.0.0.1:{httpd.server_port}/users", "POST",
                           {"email": "ann@example.com", "password": PASSWORD})
    thread.join()
    httpd.server_close()
    assert (status, body["username"]) == (200, "ann")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_logs_and_stops_cleanly(tmp_path, signum):
    db = str(tmp_path / "cli.db")
    with Process("--db", db) as process:
        assert re.fullmatch(rf"messenger {re.escape(messenger.__version__)} serving "
                            rf"http://127\.0\.0\.1:\d+/ with database {re.escape(db)}\n",
                            process.stdout[-1])
        assert call(process.url + "/nowhere")[0] == 404
        assert process.stop(signum) == 0
    log = "".join(process.log)
    assert re.search(r"^GET /nowhere 404 \d+\.\d ms$", log, re.M), log
    assert "Traceback" not in log


@pytest.mark.parametrize("path, logged", [
    ("/users/caf%C3%A9", "/users/café"), ("/users/%FF", "/users/%FF"),
    ("/a%0Ab", "/a%0Ab"), ("/a%20b%25", "/a%20b%25"), ("/%D0%BD%D0%B5%D1%82", "/нет"),
])
def test_access_log_shows_the_path_as_sent(caplog, path, logged):
    app = messenger._with_access_log(lambda environ, start: start("404 Not Found", []) or [b""])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": urllib.parse.unquote_to_bytes(path).decode("latin-1")}
    with caplog.at_level(logging.INFO, logger="messenger"):
        app(environ, lambda status, headers, exc_info=None: None)
    assert [record.getMessage().rsplit(" ", 2)[0] for record in caplog.records] == [f"GET {logged} 404"]


def test_cli_memory_database(tmp_path):
    with Process("--db", ":memory:", "--quiet") as process:
        assert call(process.url + "/users", "POST",
                    {"email": "a@example.com", "password": PASSWORD})[0] == 200
        assert process.stop() == 0


def test_cli_python_dash_m_is_the_same_program():
    here = os.path.dirname(messenger.__file__)
    result = subprocess.run([sys.executable, "-m", "messenger", "--help"], capture_output=True,
                            text=True, timeout=60, cwd=here)
    assert result.returncode == 0 and result.stdout == run_cli("--help").stdout


def test_cli_help_explains_every_flag(capsys):
    text = run_main(capsys, "--help").stdout
    for flag in ("--host", "--port", "--db", "--threads", "--max-file-mb", "--secure-cookies", "--quiet"):
        assert re.search(rf"^\s+{flag}\b.*\S", text, re.M), flag


def test_cli_max_file_mb_sets_the_limit_in_mib():
    assert messenger._parse_args(["--max-file-mb", "0.5"])[1] == {"max_file_bytes": 512 * 1024}


@pytest.mark.parametrize("args", [["--port", "abc"], ["--port", "70000"], ["--threads", "0"],
                                  ["--max-file-mb", "0"], ["--max-file-mb", "ten"], ["--max-file-mb", "inf"],
                                  ["--no-such-flag"]])
def test_cli_bad_flag_is_one_line(capsys, args):
    result = run_main(capsys, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("messenger: ")


def test_cli_port_in_use_is_one_line(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_main(capsys, "--port", str(taken.getsockname()[1]), "--db", str(tmp_path / "x.db"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot listen" in result.stderr
    assert os.listdir(tmp_path) == []  # a start that fails creates no file


def test_cli_database_in_a_missing_directory_says_so(capsys, tmp_path):
    result = run_main(capsys, "--port", "0", "--db", str(tmp_path / "missing-dir" / "x.db"))
    assert result.returncode == 1
    assert f"the directory '{tmp_path / 'missing-dir'}' does not exist" in result.stderr


@pytest.mark.parametrize("db", ["missing-dir/x.db", "."])
def test_cli_database_that_cannot_open_is_one_line(capsys, tmp_path, db):
    result = run_main(capsys, "--port", "0", "--db", str(tmp_path / db))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot open the database" in result.stderr


def test_cli_file_that_is_not_a_database(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a database, just words " * 100)
    result = run_main(capsys, "--port", "0", "--db", str(tmp_path / "notes.txt"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot open the database" in result.stderr


# ---------------------------------------------------------------------------
# 8. The mock backend (contract section 7): CORS, demo data, delay, reset
# ---------------------------------------------------------------------------


def cors_headers(response):
    return {name: value for name, value in response.headers.items()
            if name.lower().startswith("access-control-")}


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:5173",
                                    "http://[::1]:8000", "http://localhost"])
def test_cors_local_origin_is_echoed_with_credentials(api, origin):
    response = api.get("/", headers={"Origin": origin})
    assert cors_headers(response) == {"Access-Control-Allow-Origin": origin,
                                      "Access-Control-Allow-Credentials": "true",
                                      "Access-Control-Expose-Headers": "Retry-After, ETag"}


@pytest.mark.parametrize("origin", ["http://example.com", "https://localhost:3000",
                                    "http://localhost.example.com", "http://127.0.0.1.nip.io",
                                    "null"])
def test_cors_other_origin_gets_no_cors_headers(api, origin):
    response = api.get("/", headers={"Origin": origin})
    assert cors_headers(response) == {} and response.headers["Vary"] == "Origin"


@pytest.mark.parametrize("path, status", [("/", 200), ("/users", 401), ("/nowhere", 404),
                                          ("/crash", 500)])
def test_cors_headers_and_vary_on_every_answer(app, api, path, status):
    app.route("/crash", callback=lambda: 1 / 0, contract=messenger.Contract(public=True))
    response = api.get(path, headers={"Origin": "http://localhost:3000"}, status=status,
                       expect_errors=True)
    assert response.headers["Vary"] == "Origin"
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_cors_vary_without_origin(api):
    assert api.get("/").headers["Vary"] == "Origin"


@pytest.mark.parametrize("path", ["/login", "/chats/1/messages", "/nowhere", "/"])
def test_preflight_answers_204_without_session(api, path):
    response = api.options(path, headers={"Origin": "http://localhost:3000",
                                          "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type, x-trace"},
                           status=204)
    assert cors_headers(response) == {
        "Access-Control-Allow-Origin": "http://localhost:3000",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "Retry-After, ETag",
        "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "content-type, x-trace",
        "Access-Control-Max-Age": "7200",
    }
    assert response.body == b""


def test_preflight_from_other_origin_is_204_without_cors_headers(api):
    response = api.options("/login", headers={"Origin": "http://example.com",
                                              "Access-Control-Request-Method": "POST"}, status=204)
    assert cors_headers(response) == {}


def test_cors_origin_option_adds_an_origin(make_app):
    api = CheckedApp(make_app(cors_origins=["https://app.example.com"]))
    allowed = api.get("/", headers={"Origin": "https://app.example.com"})
    other = api.get("/", headers={"Origin": "https://other.example.com"})
    local = api.get("/", headers={"Origin": "http://localhost:3000"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Access-Control-Allow-Origin" not in other.headers
    assert local.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_cors_star_allows_any_origin_by_echoing_it(make_app):
    api = CheckedApp(make_app(cors_origins=["*"]))
    response = api.get("/", headers={"Origin": "https://anywhere.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://anywhere.example"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_warns_once_about_localhost_and_127(api, caplog):
    for _ in range(3):
        api.get("/", headers={"Origin": "http://localhost:3000", "Host": "127.0.0.1:8080"})
    api.get("/", headers={"Origin": "http://localhost:3000", "Host": "localhost:8080"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "drop the session cookie" in warnings[0]


def test_cors_warnings_are_bounded(app, api, caplog):
    for port in range(1000, 1300):
        api.get("/", headers={"Origin": f"http://localhost:{port}", "Host": "127.0.0.1:8080"})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(app.warned_origins) == messenger.MAX_WARNED_ORIGINS


def test_demo_fills_an_empty_database(make_app):
    app = make_app(demo=True)
    assert app.demo_seeded
    client = CheckedApp(app)
    client.post_json("/login", {"email": "ann@example.com", "password": messenger.DEMO_PASSWORD})
    chats = client.get("/chats").json["chats"]
    assert [(chat["name"], chat["type"]) for chat in chats] == [
        ("Saturday in the park", "group"), ("Bob Stone", "dialog"), ("Carol Díaz", "dialog")]
    assert [chat["unread_count"] for chat in chats] == [0, 1, 2]
    history = client.get(f"/chats/{chats[1]['id']}/messages").json["messages"]
    assert len(history) == 7 and history == sorted(history, key=lambda m: m["created_at"])
    group = client.get(f"/chats/{chats[0]['id']}/messages").json["messages"]
    assert [m["edited_at"] is not None for m in group] == [False, True, False, False, False]
    assert [m["reactions"] for m in group] == [{}, {}, {"🪁": [1]}, {"👍": [2, 3]}, {}]
    assert client.get("/photos/1").content_type == "image/svg+xml"


def test_demo_has_a_picture_a_document_and_a_reply(make_app):
    client = CheckedApp(make_app(demo=True))
    client.post_json("/login", {"email": "ann@example.com", "password": messenger.DEMO_PASSWORD})
    group, dialog = client.get("/chats").json["chats"][:2]
    messages = client.get(f"/chats/{group['id']}/messages").json["messages"]
    (picture,) = messages[3]["files"]
    assert (picture["name"], picture["content_type"], picture["width"], picture["height"]) == (
        "kite.png", "image/png", 160, 120)
    assert client.get(picture["url"]).body == messenger._demo_picture()
    assert messages[4]["reply_to_id"] == messages[3]["id"]
    documents = [file for m in client.get(f"/chats/{dialog['id']}/messages").json["messages"]
                 for file in m["files"]]
    assert [(file["name"], file["content_type"]) for file in documents] == [("picnic-list.txt", "text/plain")]
    assert client.get(documents[0]["url"]).text.startswith("Sandwiches")


def test_demo_refuses_a_database_with_users_of_its_own(make_app, tmp_path):
    app = make_app(str(tmp_path / "mine.db"))
    CheckedApp(app).post_json("/users", {"email": "mine@example.com", "password": PASSWORD})
    app.db.close()
    with pytest.raises(messenger.FixturesError, match="users of its own"):
        make_app(str(tmp_path / "mine.db"), demo=True)
    assert query(app, "SELECT email FROM users") == [("mine@example.com",)]


def test_demo_starts_as_it_is_on_the_database_it_filled(make_app, tmp_path):
    make_app(str(tmp_path / "demo.db"), demo=True).db.close()
    again = make_app(str(tmp_path / "demo.db"), demo=True)
    assert not again.demo_seeded and len(query(again, "SELECT * FROM users")) == 4


def test_reset_does_not_exist_without_the_option(api):
    assert error(api.post("/__reset", status=404)) == ("not_found", None)


def test_reset_empties_everything_and_ends_sessions(make_app):
    app = make_app(allow_reset=True)
    client = CheckedApp(app)
    client.post_json("/users", {"email": "ann@example.com", "password": PASSWORD})
    client.post_json("/login", {"email": "ann@example.com", "password": PASSWORD})
    assert CheckedApp(app).post("/__reset").json == {}
    assert error(client.get("/users", status=401)) == ("not_authorized", None)
    assert client.post_json("/users", {"email": "ann@example.com", "password": PASSWORD}).json["id"] == 1


def test_reset_seeds_the_demo_again(make_app):
    app = make_app(allow_reset=True, demo=True)
    client = CheckedApp(app)
    client.post_json("/users", {"email": "new@example.com", "password": PASSWORD})
    client.post("/__reset")
    emails = [row[0] for row in query(app, "SELECT email FROM users ORDER BY id")]
    assert emails == [user["email"] for user in messenger.demo_fixtures()["users"]]


def test_delay_waits_before_answering(make_app):
    api = CheckedApp(make_app(delay="150-200"))
    started = time.monotonic()
    api.get("/")
    assert time.monotonic() - started >= 0.15


def test_delay_skips_preflights(make_app):
    api = CheckedApp(make_app(delay=5000))
    started = time.monotonic()
    api.options("/login", headers={"Origin": "http://localhost:3000"}, status=204)
    assert time.monotonic() - started < 4


# Fixtures (contract 7)

PNG_HEADER = png_header(3, 2)
FIXTURES = {
    "users": [{"email": "ann@example.com", "password": "ann-password", "name": "Ann"},
              {"email": "bob@example.com", "password": "bob-password", "username": "bob"},
              {"email": "cat@example.com", "password": "cat-password"}],
    "chats": [{"members": ["ann@example.com", "bob@example.com"],
               "messages": [{"from": "ann@example.com", "text": "Hi!", "minutes_ago": 50},
                            {"from": "bob@example.com", "text": "Look",
                             "files": [{"name": "cat.png", "base64": base64.b64encode(PNG_HEADER).decode()}],
                             "reply_to": 0, "reactions": {"👍": ["ann@example.com"]}}]},
              {"name": "Trip", "members": ["bob@example.com", "ann@example.com", "cat@example.com"],
               "read": {"ann@example.com": 0},
               "messages": [{"from": "bob@example.com", "text": "Tickets are booked", "edited": True}]}]}


def fixture_client(app, email="ann@example.com", password="ann-password"):
    client = CheckedApp(app)
    client.post_json("/login", {"email": email, "password": password})
    return client


def test_fixtures_fill_users_chats_and_messages(make_app):
    app = make_app(fixtures=FIXTURES)
    assert app.demo_seeded
    ann = fixture_client(app)
    assert ann.get("/users").json["name"] == "Ann"
    chats = ann.get("/chats").json["chats"]
    assert [(c["type"], c["name"], c["unread_count"]) for c in chats] == [("group", "Trip", 1),
                                                                           ("dialog", "bob", 1)]
    dialog = ann.get(f"/chats/{chats[1]['id']}/messages").json["messages"]
    assert [m["text"] for m in dialog] == ["Hi!", "Look"]
    assert dialog[1]["reply_to_id"] == dialog[0]["id"] and dialog[1]["reactions"] == {"👍": [1]}
    assert (dialog[1]["files"][0]["name"], dialog[1]["files"][0]["width"]) == ("cat.png", 3)
    assert ann.get(dialog[1]["files"][0]["url"]).body == PNG_HEADER
    (trip,) = ann.get(f"/chats/{chats[0]['id']}/messages").json["messages"]
    assert trip["edited_at"] is not None and chats[0]["owner_id"] == 2


def test_fixtures_times_and_ids_follow_each_other(make_app):
    app = make_app(fixtures=FIXTURES)
    rows = query(app, "SELECT id, created_at FROM messages ORDER BY id")
    assert [created for _, created in rows] == sorted(created for _, created in rows)
    texts = [("Hi!",), ("Look",), ("Tickets are booked",)]
    assert query(app, "SELECT text FROM messages ORDER BY id") == texts


def test_fixtures_username_made_from_the_email(make_app):
    app = make_app(fixtures=FIXTURES)
    assert query(app, "SELECT username FROM users ORDER BY id") == [("ann",), ("bob",), ("cat",)]


def test_fixtures_files_by_path_beside_the_file(make_app, tmp_path):
    (tmp_path / "cat.png").write_bytes(PNG_HEADER)
    fixtures = json.loads(json.dumps(FIXTURES))
    fixtures["chats"][0]["messages"][1]["files"] = ["cat.png"]
    (tmp_path / "fixtures.json").write_text(json.dumps(fixtures))
    app = make_app(fixtures=str(tmp_path / "fixtures.json"))
    assert query(app, "SELECT name, width FROM files") == [("cat.png", 3)]


def broken(path, value):
    """FIXTURES with the entry at `path` (a list of keys) set to `value` (DELETE: removed)."""
    fixtures = json.loads(json.dumps(FIXTURES))
    *parents, last = path
    entry = fixtures
    for key in parents:
        entry = entry[key]
    if value is DELETE:
        del entry[last]
    else:
        entry[last] = value
    return fixtures


DELETE = object()
BAD_FIXTURES = [
    (["users", 0, "emial"], "x", "users[0].emial"),
    (["users", 1, "email"], "ann@example.com", "users[1].email"),
    (["users", 0, "password"], "short", "users[0].password"),
    (["users", 0, "email"], DELETE, "users[0].email"),
    (["chats", 0, "members", 1], "dan@example.com", "chats[0].members[1]"),
    (["chats", 0, "members"], ["ann@example.com"], "chats[0].members"),
    (["chats", 1, "name"], " ", "chats[1].name"),
    (["chats", 1, "messages", 0, "from"], "dan@example.com", "chats[1].messages[0].from"),
    (["chats", 0, "messages", 0, "from"], "cat@example.com", "chats[0].messages[0].from"),
    (["chats", 0, "messages", 1, "reply_to"], 1, "chats[0].messages[1].reply_to"),
    (["chats", 0, "messages", 1, "reactions"], {"👍": ["cat@example.com"]},
     "chats[0].messages[1].reactions.👍[0]"),
    (["chats", 0, "messages", 0, "text"], "", "chats[0].messages[0].text"),
    (["chats", 0, "messages", 1, "files"], [{"name": "x", "base64": "!!"}],
     "chats[0].messages[1].files[0].base64"),
    (["chats", 0, "messages", 1, "files"], ["cat.png"], "chats[0].messages[1].files[0]"),
    (["chats", 0, "messages", 0, "minutes_ago"], -1, "chats[0].messages[0].minutes_ago"),
    (["chats", 1, "read"], {"ann@example.com": 5}, "chats[1].read.ann@example.com"),
    (["chats", 1, "colour"], "red", "chats[1].colour"),
    (["users", 2, "username"], "BOB", "users[2].username"),
    (["chats", 0, "messages", 1, "files"], [{"name": "\ud800.txt", "base64": "aGk="}],
     "chats[0].messages[1].files[0].name"),
    (["chats", 0, "messages", 1, "files"], ["/etc/hostname"], "chats[0].messages[1].files[0]"),
    (["chats", 0, "messages", 1, "files"], ["nul\0.png"], "chats[0].messages[1].files[0]"),
    (["chats", 0, "messages", 1, "reactions"], [], "chats[0].messages[1].reactions"),
    (["chats", 1, "read"], {"\ud800": 1}, "chats[1].read.\\ud800"),
    (["users"], 5, "users"),
    (["chats", 1, "read"], {"ann@example.com": 0, "ANN@example.com": 1}, "chats[1].read.ANN@example.com"),
]


@pytest.mark.parametrize("path, value, at", BAD_FIXTURES, ids=[at for *_, at in BAD_FIXTURES])
def test_fixtures_error_names_its_entry_and_writes_nothing(tmp_path, path, value, at):
    db = tmp_path / "f.db"
    with pytest.raises(messenger.FixturesError) as caught:
        messenger.make_app(str(db), password_iterations=ITERATIONS, fixtures=broken(path, value))
    assert caught.value.path == at
    assert sqlite3.connect(db).execute("SELECT count(*) FROM users").fetchone() == (0,)


def test_fixtures_restart_on_the_database_they_filled(make_app, tmp_path):
    make_app(str(tmp_path / "f.db"), fixtures=FIXTURES).db.close()
    again = make_app(str(tmp_path / "f.db"), fixtures=FIXTURES)
    assert not again.demo_seeded and len(query(again, "SELECT * FROM messages")) == 3


def test_fixtures_not_with_demo(make_app):
    with pytest.raises(ValueError, match="do not go together"):
        make_app(fixtures=FIXTURES, demo=True)


def test_cli_bad_fixtures_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "fixtures.json"
    path.write_text(json.dumps(broken(["chats", 1, "messages", 0, "from"], "dan@example.com")))
    result = run_main(capsys, "--fixtures", str(path), "--db", str(tmp_path / "f.db"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"messenger: {path}: chats[1].messages[0].from: ")
    assert "not a member" in result.stderr


def test_demo_is_fixtures_the_readme_shows(make_app):
    with open(os.path.join(os.path.dirname(messenger.__file__), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    shown = json.loads(re.search(r"<!-- demo fixtures -->\n```json\n(.*?)```", readme, re.S)[1])
    assert shown == messenger.demo_fixtures()


# Test routes (contract 7): reset, the request log, faults


@pytest.fixture
def test_app(make_app):
    return make_app(test_routes=True, fixtures=FIXTURES)


@pytest.mark.parametrize("method, path", [("POST", "/__reset"), ("GET", "/__requests"), ("GET", "/__faults")])
def test_test_routes_do_not_exist_without_the_flag(api, method, path):
    assert error(api.request(path, method=method, status=404)) == ("not_found", None)


def test_allow_reset_enables_only_reset(make_app):
    client = CheckedApp(make_app(allow_reset=True))
    assert client.post("/__reset").json == {}
    assert error(client.get("/__requests", status=404)) == ("not_found", None)


def test_reset_loads_the_fixtures_in_the_body(test_app):
    ann = fixture_client(test_app)
    body = {"users": [{"email": "zed@example.com", "password": "zed-password"}]}
    assert CheckedApp(test_app).post_json("/__reset", body).json == {}
    assert error(ann.get("/users", status=401)) == ("not_authorized", None)
    assert query(test_app, "SELECT id, email FROM users") == [(1, "zed@example.com")]


def test_reset_with_bad_fixtures_changes_nothing(test_app):
    ann = fixture_client(test_app)
    fixtures = broken(["chats", 0, "members", 1], "x@y.z")
    response = CheckedApp(test_app).post_json("/__reset", fixtures, status=400)
    assert error(response) == ("invalid_fixtures", "chats[0].members[1]")
    assert ann.get("/users").json["email"] == "ann@example.com"


def test_reset_body_files_are_inline_only(test_app):
    fixtures = broken(["chats", 0, "messages", 1, "files"], ["cat.png"])
    response = CheckedApp(test_app).post_json("/__reset", fixtures, status=400)
    assert error(response) == ("invalid_fixtures", "chats[0].messages[1].files[0]")


def test_reset_without_a_body_loads_the_servers_fixtures_again(test_app):
    ann = fixture_client(test_app)
    send(ann, 1, "extra")
    CheckedApp(test_app).post("/__reset")
    assert len(query(test_app, "SELECT * FROM messages")) == 3


def test_requests_log_what_was_answered(test_app):
    ann = fixture_client(test_app)
    send(ann, 1, "logged")
    ann.get("/chats", params={"limit": "x"}, status=200)
    logged = CheckedApp(test_app).get("/__requests").json["requests"]
    assert [(r["method"], r["path"], r["status"]) for r in logged] == [
        ("POST", "/login", 200), ("POST", "/chats/1/messages", 200), ("GET", "/chats", 200)]
    login, sent, listed = logged
    assert (login["user_id"], login["body"]) == (None, {"email": "ann@example.com", "password": "***"})
    assert (sent["user_id"], sent["body"], listed["query"]) == (1, {"text": "logged"}, "limit=x")
    assert [r["id"] for r in logged] == sorted(r["id"] for r in logged) and sent["duration_ms"] >= 0


def test_requests_log_the_session_a_logout_carried(test_app):
    ann = fixture_client(test_app)
    ann.delete("/logout")
    assert CheckedApp(test_app).get("/__requests").json["requests"][-1]["user_id"] == 1


def test_requests_mask_every_password_also_nested(test_app):
    CheckedApp(test_app).post_json("/users", {"email": "x@y.z", "password": "secret-one",
                                               "nested": [{"password": "secret-two"}]})
    (logged,) = CheckedApp(test_app).get("/__requests").json["requests"]
    assert logged["body"]["nested"] == [{"password": "***"}] and "secret" not in json.dumps(logged)


def test_requests_keep_the_latest_thousand_and_clear(test_app):
    client = CheckedApp(test_app)
    for _ in range(1005):
        client.get("/")
    logged = client.get("/__requests", params={"limit": 1000}).json["requests"]
    assert len(logged) == 1000 and logged[-1]["id"] == 1005
    assert len(client.get("/__requests").json["requests"]) == 100
    assert client.delete("/__requests").json == {}
    assert client.get("/__requests").json["requests"] == []


def faults(client, *rules, status=200):
    return client.put_json("/__faults", {"faults": list(rules)}, status=status)


def test_fault_status_answers_without_running_the_route(test_app):
    ann = fixture_client(test_app)
    faults(CheckedApp(test_app), {"method": "POST", "path": "/chats/*/messages", "status": 503})
    response = ann.post_json("/chats/1/messages", {"text": "lost"}, status=503,
                             headers={"Origin": "http://localhost:3000"})
    assert error(response) == ("injected_fault", None) and response.headers["Retry-After"] == "1"
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert query(test_app, "SELECT count(*) FROM messages WHERE text = 'lost'") == [(0,)]
    assert ann.get("/chats/1/messages").status_int == 200  # another method


def test_fault_star_is_one_segment(test_app):
    ann = fixture_client(test_app)
    faults(CheckedApp(test_app), {"path": "/chats/*", "status": 500})
    assert ann.get("/chats/1", status=500).json["error"] == "injected_fault"
    assert ann.get("/chats/1/messages").status_int == 200


def test_fault_times_are_used_up(test_app):
    ann, admin = fixture_client(test_app), CheckedApp(test_app)
    faults(admin, {"path": "/users", "status": 502, "times": 2})
    assert [ann.get("/users", status="*").status_int for _ in range(3)] == [502, 502, 200]
    assert admin.get("/__faults").json == {"faults": [{"path": "/users", "status": 502, "times": 0}]}


def test_fault_rate_applies_to_a_share(test_app, monkeypatch):
    ann = fixture_client(test_app)
    faults(CheckedApp(test_app), {"path": "/users", "status": 500, "rate": 0.5},
           {"path": "/users", "status": 418})
    draws = iter([0.1, 0.9])
    monkeypatch.setattr(messenger.random, "random", lambda: next(draws))
    assert [ann.get("/users", status="*").status_int for _ in range(2)] == [500, 418]


def test_fault_delay_then_the_route_runs(test_app):
    ann = fixture_client(test_app)
    faults(CheckedApp(test_app), {"path": "/users", "delay_ms": 200})
    started = time.monotonic()
    assert ann.get("/users").json["email"] == "ann@example.com"
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("rule, mnemonic, field", [
    ({}, "missing_field", "faults[0].path"),
    ({"path": "/users"}, "invalid_field", "faults[0]"),
    ({"path": "/users", "status": 200}, "invalid_field", "faults[0].status"),
    ({"path": "/users", "status": 500, "rate": 2}, "invalid_field", "faults[0].rate"),
    ({"path": "/users", "status": 500, "times": 0}, "invalid_field", "faults[0].times"),
    ({"path": "/users", "delay_ms": 60001}, "invalid_field", "faults[0].delay_ms"),
    ({"path": "/users", "drop": "yes"}, "invalid_field", "faults[0].drop"),
    ({"path": "/users", "status": 500, "colour": "red"}, "invalid_field", "faults[0].colour"),
])
def test_fault_bad_rule_keeps_the_rules_in_force(test_app, rule, mnemonic, field):
    admin = CheckedApp(test_app)
    faults(admin, {"path": "/users", "status": 500})
    assert error(faults(admin, {"path": "/chats", "status": 500}, rule, status=400)) == (
        mnemonic, field.replace("[0]", "[1]"))
    assert admin.get("/__faults").json == {"faults": [{"path": "/users", "status": 500}]}


def test_server_fault_drop_breaks_the_connection(tmp_path):
    with Process("--db", str(tmp_path / "d.db"), "--test-routes") as process:
        call(process.url + "/__faults", "PUT", {"faults": [{"path": "/users", "drop": True, "times": 1},
                                                           {"path": "/users", "status": 502, "times": 1}]})
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(process.url + "/users", timeout=10)
        injected = {"error": "injected_fault", "message": "A fault rule of PUT /__faults answered 502."}
        assert call(process.url + "/users")[:2] == (502, injected)
        assert call(process.url + "/users")[0] == 401  # both used up
        # The log holds what was answered: not the dropped request.
        assert [r["status"] for r in call(process.url + "/__requests")[1]["requests"]] == [502, 401]
        assert process.stop() == 0
    assert not [line for line in process.log if "Traceback" in line or "Error" in line]


def stream_ended_by(tmp_path, action):
    """Open a stream, do action(server) while it waits: (seconds until it ended, what it sent)."""
    with messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, quiet=True,
                          test_routes=True) as server:
        _, cookie = login_at(server.url, "ann@example.com")
        ended = {}
        reader = threading.Thread(target=lambda: ended.update(text=read_stream(server, cookie)[1]))
        reader.start()
        assert wait_until(lambda: server.app.feed.waiting == 1)
        started = time.monotonic()
        action(server)
        reader.join()
        return time.monotonic() - started, ended["text"]


def test_server_drop_rule_ends_an_open_stream(tmp_path):
    rule = {"faults": [{"path": "/updates/stream", "drop": True}]}
    seconds, text = stream_ended_by(tmp_path, lambda server: call(server.url + "/__faults", "PUT", rule))
    assert seconds < 1 and text.startswith("retry:")


def test_server_reset_ends_open_streams(tmp_path):
    seconds, text = stream_ended_by(tmp_path, lambda server: call(server.url + "/__reset", "POST"))
    assert seconds < 1 and text.startswith("retry:")


def test_cli_fixtures_fill_the_database_and_start_as_they_are_again(tmp_path):
    (tmp_path / "fixtures.json").write_text(json.dumps(FIXTURES))
    db = str(tmp_path / "f.db")
    for _ in range(2):
        with Process("--db", db, "--fixtures", str(tmp_path / "fixtures.json")) as process:
            status, user, _ = call(process.url + "/login", "POST",
                                   {"email": "bob@example.com", "password": "bob-password"})
            assert (status, user["username"]) == (200, "bob")
            assert process.stop() == 0
    assert sqlite3.connect(db).execute("SELECT count(*) FROM messages").fetchone() == (3,)


def test_server_request_log_under_many_threads(tmp_path):
    with messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, quiet=True,
                          test_routes=True) as server:
        statuses = at_once(16, lambda n: [call(server.url + ("/__requests" if n % 2 else "/users"))[0]
                                          for _ in range(20)])
        assert {status for batch in statuses for status in batch} == {200, 401}
        ids = [r["id"] for r in call(server.url + "/__requests?limit=1000")[1]["requests"]]
        assert ids == list(range(1, 161))


def test_server_reset_is_the_reset_route_in_python(tmp_path):
    with messenger.Server(db=str(tmp_path / "s.db"), password_iterations=ITERATIONS, quiet=True,
                          fixtures=FIXTURES) as server:
        _, cookie = login_at(server.url, "new@example.com")
        server.reset()
        assert call(server.url + "/users", cookie=cookie)[0] == 401
        assert len(query(server.app, "SELECT * FROM users")) == 3
        server.reset({"users": [{"email": "solo@example.com", "password": "solo-password"}]})
        assert query(server.app, "SELECT email FROM users") == [("solo@example.com",)]


@pytest.mark.parametrize("value, expected", [(0, (0, 0)), ("250", (250, 250)),
                                             ("100-300", (100, 300)), (" 5 - 5 ", (5, 5)),
                                             ((1, 2), (1, 2))])
def test_parse_delay(value, expected):
    assert messenger.parse_delay(value) == expected


@pytest.mark.parametrize("value", ["", "fast", "-5", "300-100", "1-2-3", (5, 1)])
def test_parse_delay_refuses(value):
    with pytest.raises(ValueError):
        messenger.parse_delay(value)


@pytest.mark.parametrize("value", ["fast", "300-100", "-1"])
def test_cli_bad_delay_is_one_line(capsys, value):
    result = run_main(capsys, "--delay", value)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--delay" in result.stderr


def test_cli_bad_delay_range_is_shown_as_written(capsys):
    assert "not 400-200 " in run_main(capsys, "--delay", "400-200").stderr


def test_cli_demo_refuses_a_database_with_other_users(capsys, make_app, tmp_path):
    db = str(tmp_path / "messenger.db")
    app = make_app(db)
    CheckedApp(app).post_json("/users", {"email": "ann@example.com", "password": PASSWORD})
    app.db.close()
    result = run_main(capsys, "--demo", "--port", "0", "--db", db)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "messenger --demo --db demo.db" in result.stderr


def test_cli_demo_starts_again_on_its_own_database(make_app, tmp_path):
    db = str(tmp_path / "demo.db")
    make_app(db, demo=True).db.close()  # an earlier start with --demo
    with Process("--demo", "--db", db, "--quiet") as again:
        status, user, _ = call(again.url + "/login", "POST",
                               {"email": "bob@example.com", "password": messenger.DEMO_PASSWORD})
        assert again.stop() == 0
    assert again.stdout[0].startswith("the demo data is already there: ann@example.com")
    assert (status, user["username"]) == (200, "bob")


def test_cli_demo_prints_the_logins(tmp_path):
    with Process("--demo", "--db", str(tmp_path / "demo.db")) as process:
        assert process.stop() == 0
    lines = process.stdout
    assert lines[0].startswith("demo data added: ann@example.com, bob@example.com")
    assert messenger.DEMO_PASSWORD in lines[0] and "serving http://" in lines[1]


BROWSER_PAGE = """<!doctype html>
<html><body><pre id="result">running</pre><script>
const api = "%(api)s";
async function call(method, path, body) {
  const response = await fetch(api + path, {
    method, credentials: "include",
    headers: body ? {"Content-Type": "application/json"} : {},  // a preflight for each write
    body: body ? JSON.stringify(body) : undefined,
  });
  return [response.status, await response.json()];
}
(async () => {
  const log = [];
  try {
    log.push(await call("POST", "/users", {email: "ann@example.com", password: "%(password)s"}));
    log.push(await call("POST", "/users", {email: "bob@example.com", password: "%(password)s"}));
    log.push(await call("POST", "/login", {email: "ann@example.com", password: "%(password)s"}));
    log.push(await call("GET", "/users"));
    const [status, chat] = await call("POST", "/chats", {user_id: 2});
    log.push([status, chat]);
    log.push(await call("POST", `/chats/${chat.id}/messages`, {text: "hello from a browser"}));
    log.push(await call("GET", `/chats/${chat.id}/messages`));
    document.getElementById("result").textContent = JSON.stringify(log);
  } catch (exc) {
    document.getElementById("result").textContent = "ERROR " + exc;
  }
})();
</script></body></html>
"""


def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_page(page, tmp_path):
    """Serve an HTML page from a second port, let headless Chromium run it, and give back
    what its script wrote into <pre id="result">, as JSON."""

    class PageHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    try:
        result = subprocess.run(
            [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=20000", "--dump-dom",
             f"http://127.0.0.1:{pages.server_port}/"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        pages.shutdown()
        pages.server_close()
    found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    assert found[1].startswith("["), found[1]  # the page's error, such as a CORS failure
    return json.loads(html.unescape(found[1]))


@pytest.mark.skipif(not find_chromium(), reason="needs Chromium (Debian's chromium package)")
def test_browser_on_another_port_uses_the_api_with_cookies(tmp_path):
    with messenger.Server(password_iterations=ITERATIONS, quiet=True) as server:
        log = run_page((BROWSER_PAGE % {"api": server.url, "password": PASSWORD}).encode(), tmp_path)
    assert [status for status, _ in log] == [200] * 7
    assert log[3][1]["email"] == "ann@example.com"  # the session cookie came back
    assert [m["text"] for m in log[6][1]["messages"]] == ["hello from a browser"]


STREAM_PAGE = """<!doctype html>
<html><body><pre id="result">running</pre><script>
const api = "%(api)s";
(async () => {
  const log = [];
  try {
    const login = await fetch(api + "/login", {method: "POST", credentials: "include",
      body: JSON.stringify({email: "ann@example.com", password: "%(password)s"})});
    log.push(login.status);
    const texts = await new Promise((resolve, reject) => {
      const texts = [];
      const source = new EventSource(api + "/updates/stream", {withCredentials: true});
      source.addEventListener("message", event => {
        texts.push(JSON.parse(event.data).message.text);
        if (texts.length === 2) { source.close(); resolve(texts); }
      });
      source.onerror = () => log.push("reconnecting");  // the server ended the stream
      setTimeout(() => reject(new Error("no second message")), 15000);
    });
    log.push(texts);
    document.getElementById("result").textContent = JSON.stringify(log);
  } catch (exc) {
    document.getElementById("result").textContent = "ERROR " + exc;
  }
})();
</script></body></html>
"""


@pytest.mark.skipif(not find_chromium(), reason="needs Chromium (Debian's chromium package)")
def test_browser_event_source_gets_messages_across_a_server_ended_stream(tmp_path):
    with messenger.Server(password_iterations=ITERATIONS, quiet=True, stream_seconds=1) as server:
        ann_cookie, bob_cookie, chat_id, _ = two_in_a_chat(server)
        feed, url = server.app.feed, f"{server.url}/chats/{chat_id}/messages"

        def bob_writes():
            # The first while the page's stream is open; the second after the
            # server ended it, before the browser is back.
            if wait_until(lambda: feed.waiting == 1, 60):
                call(url, "POST", {"text": "first"}, bob_cookie)
                if wait_until(lambda: feed.waiting == 0, 60):
                    call(url, "POST", {"text": "second"}, bob_cookie)

        writer = threading.Thread(target=bob_writes)
        writer.start()
        log = run_page((STREAM_PAGE % {"api": server.url, "password": PASSWORD}).encode(), tmp_path)
        writer.join()
    assert log[0] == 200 and "reconnecting" in log
    assert log[-1] == ["first", "second"]


FILE_PAGE = """<!doctype html>
<html><body><pre id="result">running</pre><div id="pictures"></div><script>
const API = "%(api)s";
(async () => {
  const log = [];
  try {
    await fetch(API + "/login", {method: "POST", credentials: "include",
      body: JSON.stringify({email: "ann@example.com", password: "%(password)s"})});
    // What an <input type=file> holds: a File. The README's example, with the file made here.
    const bytes = Uint8Array.from(atob("%(png)s"), c => c.charCodeAt(0));
    const form = new FormData();
    form.append("file", new File([bytes], "kite.png", {type: "image/png"}));
    let response = await fetch(API + "/files", {method: "POST", credentials: "include", body: form});
    const file = await response.json();
    log.push([response.status, file]);
    response = await fetch(API + "/chats/%(chat)s/messages", {method: "POST", credentials: "include",
      body: JSON.stringify({file_ids: [file.id], client_id: "browser-1"})});
    log.push([response.status, await response.json()]);
    const img = Object.assign(document.createElement("img"), {src: API + file.url});
    document.getElementById("pictures").append(img);
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; });
    log.push([img.naturalWidth, img.naturalHeight]);
    const big = new FormData();
    big.append("photo", new File([new Uint8Array(6000000)], "huge.png", {type: "image/png"}));
    response = await fetch(API + "/photos", {method: "POST", credentials: "include", body: big});
    log.push([response.status, await response.json()]);  // readable: not "Failed to fetch"
    document.getElementById("result").textContent = JSON.stringify(log);
  } catch (exc) {
    document.getElementById("result").textContent = "ERROR " + exc;
  }
})();
</script></body></html>
"""


@pytest.mark.skipif(not find_chromium(), reason="needs Chromium (Debian's chromium package)")
def test_browser_uploads_a_picture_sends_it_and_shows_it(tmp_path):
    with messenger.Server(password_iterations=ITERATIONS, quiet=True) as server:
        _, _, chat_id, _ = two_in_a_chat(server)
        page = FILE_PAGE % {"api": server.url, "password": PASSWORD, "chat": chat_id,
                            "png": base64.b64encode(messenger._demo_picture()).decode()}
        log = run_page(page.encode(), tmp_path)
    (status, file), (sent_status, message), size, (too_large, answer) = log
    assert (status, file["name"], file["content_type"], file["width"], file["height"]) == (
        200, "kite.png", "image/png", *messenger.DEMO_PICTURE_SIZE)
    assert (sent_status, message["files"], message["client_id"]) == (200, [file], "browser-1")
    assert size == list(messenger.DEMO_PICTURE_SIZE)
    assert (too_large, answer["error"]) == (413, "payload_too_large")


E2E_PAGE = """<!doctype html>
<html><body><pre id="result">running</pre><script>
const API = "%(api)s";
const call = (method, path, body) => fetch(API + path, {method, credentials: "include",
                                                         body: body && JSON.stringify(body)});
(async () => {
  const log = [];
  try {
    // The suite's fixture: a fresh server state of its own.
    log.push((await call("POST", "/__reset", %(fixtures)s)).status);
    log.push((await call("POST", "/login", {email: "ann@example.com", password: "ann-password"})).status);
    const rule = {method: "POST", path: "/chats/*/messages", status: 503, times: 1};
    await call("PUT", "/__faults", {faults: [rule]});
    // The client under test: a send that meets a 503 and retries after Retry-After.
    let response = await call("POST", "/chats/1/messages", {text: "hello", client_id: "e2e-1"});
    log.push([response.status, response.headers.get("Retry-After"), (await response.json()).error]);
    response = await call("POST", "/chats/1/messages", {text: "hello", client_id: "e2e-1"});
    log.push([response.status, (await response.json()).text]);
    // The assertion: what the client really sent.
    const {requests} = await (await call("GET", "/__requests")).json();
    log.push(requests.filter(r => r.path === "/chats/1/messages").map(r => [r.status, r.body]));
    document.getElementById("result").textContent = JSON.stringify(log);
  } catch (exc) {
    document.getElementById("result").textContent = "ERROR " + exc;
  }
})();
</script></body></html>
"""


@pytest.mark.skipif(not find_chromium(), reason="needs Chromium (Debian's chromium package)")
def test_browser_resets_meets_a_fault_retries_and_reads_its_requests(tmp_path):
    with Process("--db", str(tmp_path / "e2e.db"), "--test-routes") as process:
        page = E2E_PAGE % {"api": process.url, "fixtures": json.dumps(FIXTURES)}
        log = run_page(page.encode(), tmp_path)
        assert process.stop() == 0
    assert log[:2] == [200, 200]
    assert log[2] == [503, "1", "injected_fault"] and log[3] == [200, "hello"]
    body = {"text": "hello", "client_id": "e2e-1"}
    assert log[4] == [[503, body], [200, body]]


# ---------------------------------------------------------------------------
# Under attack: hostile input, access control, crashes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attacked_server():
    """One server for every kind of malformed request: each must leave it serving."""
    with messenger.Server(password_iterations=ITERATIONS, quiet=True) as server:
        yield server


def raw_request(server, data):
    """Send raw bytes, half-close, and read what comes back (b"" if the server just closed)."""
    answer = b""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        try:
            sock.sendall(data)
            with contextlib.suppress(OSError):  # not connected: the server answered and closed already
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # the server answered and closed while we still sent
            pass
    return answer


@pytest.mark.parametrize("data, status", [
    (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{\"email\": \"a@b.c\"}", b"400"),
    (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{}", None),
    (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", b"400"),
    (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}", b"400"),
    (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\n{}\r\n0\r\n\r\n", b"400"),
    (b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}", b"501"),
    (b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    (b"\x00\x01\x02 nonsense\r\n\r\n", b"400"),
    (b"GET /users HTTP/1.1\r\nHost: x\r\nCookie: \xff\xfe=\x00; session_id=\xff\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\nOrigin: http://localhost:3000\r\n\r\n", b"200"),
    (b"OPTIONS /login HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:3000\r\n"
     b"Access-Control-Request-Headers: \xff\xfe\r\n\r\n", b"204"),
], ids=["short-content-length", "long-content-length", "two-content-lengths",
        "negative-content-length", "content-length-and-chunked", "unknown-transfer-encoding",
        "bad-chunk", "oversized-header", "garbage", "binary-cookie", "binary-host",
        "binary-preflight-headers"])
def test_server_malformed_http_is_refused_and_server_lives_on(attacked_server, data, status):
    server = attacked_server
    answer = raw_request(server, data)
    if status is None:
        assert answer == b""  # the body never came: the connection just ends
    else:
        assert answer.split(b" ")[1] == status and b"Traceback" not in answer
    assert call(server.url + "/nowhere")[0] == 404


@pytest.mark.parametrize("text", ["100%", "a_b", "back\\slash", "'; DROP TABLE users; --",
                                  "Robert'); DELETE FROM messages; --", '"quoted" <b>&amp;</b>'])
def test_hostile_text_is_stored_and_returned_literally(ann, chat, text):
    assert send(ann, chat["id"], text)["text"] == text
    assert ann.get(f"/chats/{chat['id']}/messages").json["messages"][-1]["text"] == text
    assert ann.put_json(f"/users/{ann.user['id']}", profile(ann, name=text, status=text)).json["name"] == text


# Every route that needs a session, from the routes' own declarations; the
# search (/users/{text}) as well as /users/{id}.
SESSION_ROUTES = [(method, re.sub(r"<[^>]+>", "1", path))
                  for method, path, _, contract in messenger.ROUTES if not contract.public]
SESSION_ROUTES.append(("GET", "/users/ann"))


def test_public_routes_are_the_contracts(make_app):
    app = make_app(allow_reset=True)
    public = {(r.method, r.rule) for r in app.routes if r.config["contract"].public}
    assert public == {("POST", "/users"), ("POST", "/sign_up"), ("POST", "/login"), ("GET", "/"),
                      ("GET", "/openapi.json"), ("POST", "/__reset")}


@pytest.mark.parametrize("method, path", SESSION_ROUTES)
def test_logged_out_session_is_401_everywhere(api, ann, chat, method, path):
    token = login_cookie(api, "ann@example.com").split(";")[0]
    api.delete("/logout")
    fresh = CheckedApp(api.app)
    response = fresh.request(path, method=method, body=b"{}", headers={"Cookie": token}, status=401)
    assert error(response) == ("not_authorized", None)


@pytest.mark.parametrize("method, path", SESSION_ROUTES)
def test_expired_session_is_401_everywhere(app, ann, chat, method, path):
    with app.db.transaction() as conn:
        conn.execute("UPDATE sessions SET expires_at = ?", (time.time() - 1,))
    response = ann.request(path, method=method, body=b"{}", status=401)
    assert error(response) == ("not_authorized", None)


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/chats/{}", None),
    ("GET", "/chats/{}/messages", None),
    ("POST", "/chats/{}/messages", {"text": "intrusion"}),
    ("POST", "/chats/{}/read", {}),
])
def test_outsider_cannot_touch_a_chat(app, login, ann, bob, chat, method, path, body):
    send(bob, chat["id"], "private")
    before = query(app, "SELECT * FROM messages"), query(app, "SELECT * FROM chat_members")
    response = login().request(path.format(chat["id"]), method=method,
                               body=json.dumps(body).encode() if body else b"", status=400)
    assert error(response) == ("chat_not_found", None)
    assert (query(app, "SELECT * FROM messages"), query(app, "SELECT * FROM chat_members")) == before


def test_outsider_sees_no_updates_of_a_chat(login, ann, bob, chat):
    outsider = login()
    send(bob, chat["id"], "private")
    bob.post_json(f"/chats/{chat['id']}/read", {})
    assert updates(outsider) == []


def test_login_unknown_email_takes_as_long_as_wrong_password(make_app):
    api = CheckedApp(make_app(password_iterations=50_000))
    api.post_json("/users", {"email": "ann@example.com", "password": PASSWORD})

    def seconds(email):
        started = time.perf_counter()
        api.post_json("/login", {"email": email, "password": "wrong password"}, status=400)
        return time.perf_counter() - started

    # Interleaved, so both kinds meet the same noise; the fastest of each,
    # since noise only ever adds time.
    # Nine wrong passwords: one fewer than the throttle allows.
    pairs = [(seconds(f"who{n}@example.com"), seconds("ann@example.com")) for n in range(9)]
    unknown, wrong = min(u for u, _ in pairs), min(w for _, w in pairs)
    # Both run one 50,000-iteration hash (about 12 ms); without it, an unknown
    # email would answer in well under a millisecond.
    assert 0.5 < unknown / wrong < 2


def test_acknowledged_messages_survive_sigkill(tmp_path):
    db = str(tmp_path / "crash.db")
    acknowledged, stop = [], threading.Event()

    def sender(url, cookie, chat_id):
        n = 0
        while not stop.is_set():
            try:
                status, body, _ = call(f"{url}/chats/{chat_id}/messages", "POST", {"text": str(n)},
                                       cookie)
            except (OSError, http.client.HTTPException, ValueError):
                return  # the server is gone, maybe in the middle of an answer
            if status == 200:
                acknowledged.append(body["id"])
            n += 1

    with Process("--db", db, "--quiet") as process:
        _, ann_cookie = login_at(process.url, "ann@example.com")
        bob_id = call(process.url + "/users", "POST",
                      {"email": "bob@example.com", "password": PASSWORD})[1]["id"]
        chat_id = call(process.url + "/chats", "POST", {"user_id": bob_id}, ann_cookie)[1]["id"]
        threads = [threading.Thread(target=sender, args=(process.url, ann_cookie, chat_id))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        process.kill()  # SIGKILL, in the middle of the stream
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    with Process("--db", db, "--quiet") as process:
        cookie = call(process.url + "/login", "POST", {"email": "ann@example.com",
                                                       "password": PASSWORD})[2]["Set-Cookie"]
        cookie = cookie.split(";")[0]
        stored, after = [], 0
        while True:
            body = call(f"{process.url}/chats/{chat_id}/messages?limit=100&after={after}",
                        cookie=cookie)[1]
            stored += [message["id"] for message in body["messages"]]
            if not body["has_more"]:
                break
            after = stored[-1]
        assert process.stop() == 0
    assert len(acknowledged) > 10
    assert len(stored) == len(set(stored))
    assert set(acknowledged) <= set(stored)


# ---------------------------------------------------------------------------
# The product as users run it: the command, default flags, a file, non-Latin text
# ---------------------------------------------------------------------------


def request_raw(url, method, path, body=None, cookie=None, headers=()):
    """One request with a path sent as written (non-ASCII percent-encoded): (status, headers, body bytes)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    sent = dict(headers, Origin="http://localhost:3000")
    if cookie:
        sent.setdefault("Cookie", cookie)
    try:
        connection.request(method, urllib.parse.quote(path, safe="/?&=%"), data, sent)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The messenger command with its default flags (the access log on) on a file database,
    with two users who share a dialog of two messages and a group: (process, context for the paths)."""
    db = str(tmp_path_factory.mktemp("default") / "messenger.db")
    with Process("--db", db) as process:
        ivan_id, ivan = login_at(process.url, "иван@пример.рф", username="Иван", name="Иван Петров")
        petr_id = call(process.url + "/users", "POST", {"email": "пётр@пример.рф", "username": "пётр",
                                                        "password": PASSWORD})[1]["id"]
        chat_id = call(process.url + "/chats", "POST", {"user_id": petr_id}, ivan)[1]["id"]
        message_id, doomed_id = (call(f"{process.url}/chats/{chat_id}/messages", "POST", {"text": text},
                                      ivan)[1]["id"] for text in ("Привет, мир! 👋", "Удали меня"))
        group_id = call(process.url + "/chats", "POST", {"name": "Друзья", "member_ids": [petr_id]},
                        ivan)[1]["id"]
        report, headers = multipart("отчёт.pdf", DIGITS)
        file_id = json.loads(request_raw(process.url, "POST", "/files", report, ivan, headers)[2])["id"]
        yield process, {"me": ivan_id, "other": petr_id, "chat": chat_id, "message": message_id,
                        "doomed": doomed_id, "group": group_id, "file": file_id, "cookie": ivan}
        assert process.stop() == 0


def cyrillic_profile(**changes):
    return dict({"email": "иван@пример.рф", "username": "Иван", "name": "Иван Петров",
                 "status": "Пишу из Москвы ✈", "phone": "+7 (900) 000-00-00"}, **changes)


# Every route once, with non-ASCII paths and bodies, errors included:
# method, path, body, status, error mnemonic (None: a success).
NON_LATIN_REQUESTS = [
    ("GET", "/", None, 200, None),
    ("GET", "/нет", None, 404, "not_found"),
    ("POST", "/чаты/1", {}, 404, "not_found"),
    ("OPTIONS", "/чаты", None, 204, None),
    ("POST", "/users", {"email": "анна@пример.рф", "password": "пароль-длинный", "username": "Анна"},
     200, None),
    ("POST", "/sign_up", {"email": "иван@пример.рф", "password": "пароль-длинный"}, 400, "email_taken"),
    ("POST", "/users", {"email": "ёж@пример.рф", "password": "пароль-длинный", "username": "ёж ёж"},
     400, "invalid_field"),
    ("POST", "/login", {"email": "ИВАН@пример.рф", "password": "неверный пароль"}, 400,
     "wrong_credentials"),
    ("GET", "/users", None, 200, None),
    ("GET", "/users/{me}", None, 200, None),
    ("GET", "/users/иван", None, 200, None),
    ("GET", "/users/ПЕТР?limit=5", None, 200, None),
    ("GET", "/users/%FF", None, 400, "invalid_field"),
    ("GET", "/users/а?limit=ноль", None, 400, "invalid_field"),
    ("DELETE", "/users/иван", None, 405, "method_not_allowed"),
    ("PUT", "/users/{me}", cyrillic_profile(), 200, None),
    ("PUT", "/users/{me}", cyrillic_profile(username="пётр"), 400, "username_taken"),
    ("PUT", "/users/{other}", cyrillic_profile(), 403, "forbidden"),
    ("PUT", "/users/１", cyrillic_profile(), 400, "invalid_field"),
    ("POST", "/photos", multipart("фото.png", PNG, "image/png", "photo"), 200, None),
    ("POST", "/photos", multipart("фото.svg", b"<svg/>", "image/png", "photo"), 400, "invalid_image"),
    ("GET", "/photos/{other}", None, 200, None),
    ("GET", "/photos/１２", None, 400, "invalid_field"),
    ("DELETE", "/photos", None, 200, None),
    ("POST", "/chats", {"user_id": "{other}"}, 200, None),
    ("POST", "/chats", {"user_id": "２"}, 400, "invalid_field"),
    ("GET", "/chats", None, 200, None),
    ("GET", "/chats/{chat}", None, 200, None),
    ("GET", "/chats/%EF%BC%91%EF%BC%92", None, 400, "invalid_field"),
    ("POST", "/chats/{chat}/messages", {"text": "Ещё одно сообщение 🙂"}, 200, None),
    ("POST", "/chats/{chat}/messages", b'{"text": "\\ud800"}', 400, "invalid_field"),
    ("POST", "/chats/{chat}/messages", b'{"text": "\xd0\xbf\xff"}', 400, "invalid_json"),
    ("GET", "/chats/{chat}/messages?before=ёлка", None, 400, "invalid_field"),
    ("GET", "/chats/{chat}/messages", None, 200, None),
    ("POST", "/files", multipart("фото.png", png_header(3, 2), "image/png"), 200, None),
    ("POST", "/files", multipart("пусто.txt", b"", "text/plain"), 400, "invalid_field"),
    ("POST", "/files", ({"файл": "нет"}, {}), 400, "missing_field"),
    ("GET", "/files/{file}", None, 200, None),
    ("GET", "/files/{file}", (None, {"Range": "bytes=90-"}), 206, None),
    ("GET", "/files/{file}", (None, {"Range": "bytes=100-"}), 416, "range_not_satisfiable"),
    ("GET", "/files/ё", None, 400, "invalid_field"),
    ("POST", "/chats/{chat}/messages", {"text": "Смотри", "file_ids": ["{file}"], "client_id": "ключ-1"}, 400,
     "invalid_field"),
    ("POST", "/chats/{chat}/messages", {"text": "Смотри отчёт", "file_ids": ["{file}"], "client_id": "k-1",
                                        "reply_to_id": "{message}"}, 200, None),
    ("POST", "/chats/{chat}/messages", {"text": "Смотри отчёт", "file_ids": ["{file}"], "client_id": "k-1"},
     200, None),
    ("POST", "/chats/{chat}/messages", {"text": "ответ", "reply_to_id": 999}, 400, "message_not_found"),
    ("GET", "/chats/{chat}/messages/{message}", None, 200, None),
    ("GET", "/chats/{chat}/messages/ё", None, 400, "invalid_field"),
    ("GET", "/messages?query=отчёт", None, 200, None),
    ("POST", "/chats/{chat}/typing", {"typing": True}, 200, None),
    ("POST", "/chats/{chat}/typing", {"typing": "да"}, 400, "invalid_field"),
    ("POST", "/chats", {"name": "Поездка в Казань 🚆", "member_ids": ["{other}"]}, 200, None),
    ("POST", "/chats", {"name": "\u2028"}, 400, "invalid_field"),
    ("GET", "/chats/{group}/members", None, 200, None),
    ("GET", "/chats/ы/members", None, 400, "invalid_field"),
    ("PUT", "/chats/{group}", {"name": "Поездка в Сочи"}, 200, None),
    ("PUT", "/chats/{chat}", {"name": "Наш чат"}, 403, "forbidden"),
    ("POST", "/chats/{group}/members", {"user_id": "{other}"}, 200, None),
    ("POST", "/chats/{group}/members", {"user_id": "один"}, 400, "invalid_field"),
    ("DELETE", "/chats/{group}/members/ёж", None, 400, "invalid_field"),
    ("DELETE", "/chats/{group}/members/{other}", None, 200, None),
    ("PUT", "/chats/{chat}/messages/{message}", {"text": "Привет, мир! (исправлено)"}, 200, None),
    ("PUT", "/chats/{chat}/messages/{message}", {"text": "\u3000"}, 400, "invalid_field"),
    ("PUT", "/chats/{chat}/messages/{message}/reaction", {"emoji": "👍🏽"}, 200, None),
    ("PUT", "/chats/{chat}/messages/{message}/reaction", {"emoji": "ёёёёёёёёёёёёёёёёё"}, 400,
     "invalid_field"),
    ("DELETE", "/chats/{chat}/messages/{message}/reaction", None, 200, None),
    ("DELETE", "/chats/{chat}/messages/{doomed}", None, 200, None),
    ("DELETE", "/chats/{chat}/messages/я", None, 400, "invalid_field"),
    ("GET", "/messages?query=привет мир", None, 200, None),
    ("GET", "/messages?query=ёлка&chat_id=ы", None, 400, "invalid_field"),
    ("POST", "/chats/{chat}/read", {"message_id": "{message}"}, 200, None),
    ("GET", "/updates?offset=ё", None, 400, "invalid_field"),
    ("GET", "/updates", None, 200, None),
    ("GET", "/updates/stream?offset=ё", None, 400, "invalid_field"),
    ("GET", "/openapi.json", None, 200, None),
    ("DELETE", "/logout", (None, {"Cookie": "session_id=чужой".encode()}), 401, "not_authorized"),
]


def logged_path(path):
    """How the access log shows a path: the query left out, UTF-8 as text."""
    return urllib.parse.unquote(path.split("?")[0], errors="strict") if "%FF" not in path else path


@pytest.mark.parametrize("method, path, body, status, mnemonic", NON_LATIN_REQUESTS,
                         ids=[f"{r[0]} {r[1]} {r[3]}" for r in NON_LATIN_REQUESTS])
def test_default_command_answers_non_latin_requests(default_server, method, path, body, status,
                                                    mnemonic):
    process, context = default_server
    path = path.format(**context)
    headers = {}
    if isinstance(body, tuple):
        body, headers = body
    elif isinstance(body, dict):
        body = json.loads(re.sub(r'"\{(\w+)\}"', lambda name: str(context[name[1]]), json.dumps(body)))
    seen = len(process.log)
    answer_status, answer_headers, answer = request_raw(process.url, method, path, body,
                                                        context["cookie"], headers)
    assert answer_status == status, answer
    assert answer_headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    if mnemonic:
        assert answer_headers["Content-Type"] == "application/json"
        assert json.loads(answer)["error"] == mnemonic
    line = f"{method} {logged_path(path)} {status} "
    assert wait_until(lambda: any(entry.startswith(line) for entry in process.log[seen:])), \
        process.log[seen:]
    assert not [entry for entry in process.log if "Traceback" in entry or "Exception" in entry]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_second_command_takes_the_other_core(tmp_path):
    with Process("--db", str(tmp_path / "a.db")) as first:
        cores = sorted(os.sched_getaffinity(0))
        pinned = messenger._pinned_processes(cores)
        with Process("--db", str(tmp_path / "b.db")) as second:
            taken = os.sched_getaffinity(second.popen.pid)
            assert len(taken) == 1 and pinned[min(taken)] == min(pinned.values())
            second.stop()
        first.stop()


def test_least_taken_core_is_chosen():
    assert messenger._least_taken_core([0, 1, 2], {0: 1, 1: 0, 2: 0}, {1: 50, 2: 3}) == 2


def test_pinning_is_turned_off_by_a_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MESSENGER_PIN", "0")
    with Process("--db", str(tmp_path / "a.db")) as process:
        assert os.sched_getaffinity(process.popen.pid) == os.sched_getaffinity(0)
        process.stop()


def test_default_command_runs_on_one_core(default_server):
    process, _ = default_server
    with open(f"/proc/{process.popen.pid}/status") as status:
        allowed = re.search(r"Cpus_allowed_list:\s*(\S+)", status.read())[1]
    assert re.fullmatch(r"\d+", allowed)  # one core, not a list or a range


def test_default_command_writes_utf8_json(default_server):
    process, context = default_server
    _, _, answer = request_raw(process.url, "GET", "/users/{}".format(context["me"]),
                               cookie=context["cookie"])
    assert "Иван Петров".encode() in answer and b"\\u" not in answer


def test_every_route_is_in_the_non_latin_tour(app):
    toured = {(method, re.sub(r"/(\{\w+\}|[^/?]*[^\x00-\x7f/?][^/?]*|%FF|１２?)", "/1",
                             path.split("?")[0]))
              for method, path, *_ in NON_LATIN_REQUESTS}
    routes = {(r.method, re.sub(r"<[^>]+>", "1", r.rule)) for r in app.routes}
    assert routes <= toured
