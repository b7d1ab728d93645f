"""Performance of messenger, as ratios to the framework's own ceiling, measured in one run.

    python bench/perf.py              # about four minutes
    python bench/perf.py --quick      # smaller data and shorter runs, for a first look

The ceiling is a bare Bottle route that returns a six-field user object, served
by the same waitress configuration and loaded by the same client in the same
run. Servers run in their own processes; with two or more cores the server is
pinned to one core and the load generator to another. The load generator is
wrk (Debian's `wrk` package) when it is installed, else a Python client; the
report says which. Nothing here is a pass/fail test: it prints the figures
and how they compare with the goals.
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import messenger  # noqa: E402  (this checkout's, not an installed one)

PASSWORD = "benchmark password"
BENCH_ITERATIONS = 1000  # logins are not what this measures
# What the ceiling's route answers: a user object, as GET /users does.
CEILING_USER = {"id": 1, "email": "ann@example.com", "username": "ann", "name": "Ann Lee",
                "status": "", "phone": ""}
# Messages of a real chat's length, about 70 characters, one in Russian.
MESSAGES = [
    "Are we still on for Saturday? I could pick you up at ten, if that works.",
    "Yes! Let's meet at the park entrance, I'll bring sandwiches and coffee.",
    "Привет! Я уже на месте, возле входа в парк. Ты скоро будешь? Жду тебя.",
    "Running ten minutes late, sorry, the bus broke down near the station :(",
]
WORDS = ["anna", "boris", "chen", "dmitri", "elena", "farid", "gosha", "hana", "ivan", "julia",
         "kofi", "lena", "maria", "nikolai", "olga", "pavel", "qiu", "rosa", "sasha", "tomas"]


# ---------------------------------------------------------------------------
# Servers in their own processes
# ---------------------------------------------------------------------------


def serve(kind, db, synchronous, cpu, threads):
    """The --serve mode: run one server in this process and print its URL."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if kind == "ceiling":
        app = messenger.bottle.Bottle()
        app.route("/ping", callback=lambda: CEILING_USER)
        app.options = messenger.Options(quiet=True, threads=threads)
    else:
        if synchronous != "NORMAL":
            open_connection = messenger.Database._open

            def _open(self):
                conn = open_connection(self)
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                return conn

            messenger.Database._open = _open
        app = messenger.make_app(db, password_iterations=BENCH_ITERATIONS, quiet=True, threads=threads)
    server = messenger.Server(app, port=0)
    print(server.url, flush=True)
    threading.Event().wait()  # until the benchmark terminates this process


class Server:
    """A server process of this script's --serve mode."""

    def __init__(self, kind, db=":memory:", synchronous="NORMAL", cpu=None, threads=16):
        command = [sys.executable, __file__, "--serve", kind, "--db", db, "--synchronous", synchronous,
                   "--threads", str(threads)]
        if cpu is not None:
            command += ["--cpu", str(cpu)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()
        self.host, self.port = re.match(r"http://([\d.]+):(\d+)", self.url).groups()

    def call(self, method, path, body=None, cookie=None):
        connection = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        headers = {"Cookie": cookie} if cookie else {}
        connection.request(method, path, None if body is None else json.dumps(body), headers)
        response = connection.getresponse()
        data = json.loads(response.read() or b"null")
        cookie = (response.getheader("Set-Cookie") or "").split(";")[0]
        connection.close()
        return response.status, data, cookie

    def login(self, email, register=True):
        if register:
            self.call("POST", "/users", {"email": email, "password": PASSWORD})
        status, user, cookie = self.call("POST", "/login", {"email": email, "password": PASSWORD})
        assert status == 200, user
        return user["id"], cookie

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


# ---------------------------------------------------------------------------
# Load generators
# ---------------------------------------------------------------------------


def load(url, seconds, connections, cookie=None, post=None, cpu=None):
    """Requests per second and p99 latency (ms) of one URL under load."""
    if shutil.which("wrk"):
        return wrk(url, seconds, connections, cookie, post, cpu)
    return python_load(url, seconds, connections, cookie, post)


def wrk(url, seconds, connections, cookie, post, cpu):
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if cookie:
        command += ["-H", f"Cookie: {cookie}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if post is not None:
            script.write(f"wrk.method = 'POST'\nwrk.body = {json.dumps(json.dumps(post))}\n")
            command += ["-s", script.name]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    output = subprocess.run(command + [url], capture_output=True, text=True, preexec_fn=pin).stdout
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", output).groups()
    p99 = float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        print(f"    ({errors[1]} non-2xx answers from {url})")
    return rps, p99


def python_load(url, seconds, connections, cookie, post):
    host, port, path = re.match(r"http://([\d.]+):(\d+)(.*)", url).groups()
    latencies, lock = [], threading.Lock()
    deadline = time.monotonic() + seconds

    def run():
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {"Cookie": cookie} if cookie else {}
        mine = []
        while time.monotonic() < deadline:
            started = time.perf_counter()
            connection.request("POST" if post else "GET", path,
                               json.dumps(post) if post else None, headers)
            connection.getresponse().read()
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return len(latencies) / seconds, latencies[int(len(latencies) * 0.99)] * 1000


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def small_world(server, dialogs=20, history=60):
    """A user with `dialogs` dialogs, one of them `history` messages long: (cookie, chat id)."""
    me, cookie = server.login("me@example.com")
    chats = []
    for n in range(dialogs):
        other, other_cookie = server.login(f"friend{n}@example.com")
        chat_id = server.call("POST", "/chats", {"user_id": other}, cookie)[1]["id"]
        server.call("POST", f"/chats/{chat_id}/messages", {"text": "hello there"}, other_cookie)
        chats.append(chat_id)
    for n in range(history):
        text = MESSAGES[n % len(MESSAGES)]
        server.call("POST", f"/chats/{chats[0]}/messages", {"text": text}, cookie)
    return cookie, chats[0]


def reacted_history(server, cookie, history=60):
    """A dialog of `history` messages, a third of them with two reactions: its id."""
    other, other_cookie = server.login("reactor@example.com")
    chat_id = server.call("POST", "/chats", {"user_id": other}, cookie)[1]["id"]
    for n in range(history):
        message = server.call("POST", f"/chats/{chat_id}/messages", {"text": MESSAGES[n % 4]}, cookie)[1]
        if n % 3 == 0:
            for who, emoji in ((cookie, "👍"), (other_cookie, "😂")):
                server.call("PUT", f"/chats/{chat_id}/messages/{message['id']}/reaction",
                            {"emoji": emoji}, who)
    return chat_id


def group_world(server, sizes=(10, 100), groups=5):
    """Users in groups: a member of 20 dialogs and `groups` groups of 10 (cookie), and groups of
    `sizes` members whose owner sends: ({size: group id}, owner cookie, the members' cookies)."""
    member_id, member = server.login("member@example.com")
    for n in range(20):
        other, _ = server.login(f"pal{n}@example.com")
        server.call("POST", "/chats", {"user_id": other}, member)
    owner_id, owner = server.login("owner@example.com")
    people = [server.login(f"person{n}@example.com") for n in range(max(sizes) - 1)]
    for n in range(groups):
        ids = [member_id] + [person for person, _ in people[n * 9:n * 9 + 8]]
        group = server.call("POST", "/chats", {"name": f"Group {n}", "member_ids": ids}, owner)[1]
        for _ in range(3):
            server.call("POST", f"/chats/{group['id']}/messages", {"text": MESSAGES[n % 4]}, owner)
    sized = {}
    for size in sizes:
        ids = [person for person, _ in people[:size - 1]]
        body = {"name": f"{size} members", "member_ids": ids}
        sized[size] = server.call("POST", "/chats", body, owner)[1]["id"]
    return member, sized, owner, [cookie for _, cookie in people]


def big_world(path, users, dialogs, messages):
    """Generate a large database straight into SQLite; user 1 has 20 of the dialogs."""
    messenger.make_app(path, password_iterations=BENCH_ITERATIONS).db.close()
    password_hash = messenger.hash_password(PASSWORD, BENCH_ITERATIONS)
    rng = random.Random(7)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    stamp = "2026-01-01T00:00:00.000Z"

    def user_rows():
        for n in range(1, users + 1):
            username = "me" if n == 1 else f"{rng.choice(WORDS)}_{rng.choice(WORDS)}{n}"
            yield n, f"u{n}@example.com", f"u{n}@example.com", username, username, password_hash, stamp

    conn.executemany("INSERT INTO users (id, email, email_key, username, username_key, password_hash,"
                     " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", user_rows())
    pairs = [(1, n) for n in range(2, 22)]
    seen = set(pairs)
    while len(pairs) < dialogs:
        pair = tuple(sorted(rng.sample(range(2, users + 1), 2)))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    conn.executemany("INSERT INTO chats (id, type, user_low, user_high, created_at, opened_after)"
                     " VALUES (?, 'dialog', ?, ?, ?, 0)",
                     ((n, low, high, stamp) for n, (low, high) in enumerate(pairs, 1)))
    conn.executemany("INSERT INTO chat_members (user_id, chat_id) VALUES (?, ?)",
                     ((user, n) for n, pair in enumerate(pairs, 1) for user in pair))
    per_chat = messages // dialogs
    conn.executemany(
        "INSERT INTO messages (chat_id, author_id, text, created_at) VALUES (?, ?, ?, ?)",
        ((n % dialogs + 1, pairs[n % dialogs][n // dialogs % 2], f"message {n} of the benchmark", stamp)
         for n in range(per_chat * dialogs)),
    )
    conn.execute("UPDATE chats SET last_message_id ="
                 " (SELECT max(id) FROM messages WHERE messages.chat_id = chats.id)")
    conn.execute("UPDATE chat_members SET unread_count = (SELECT count(*) FROM messages AS m"
                 " WHERE m.chat_id = chat_members.chat_id AND m.author_id <> chat_members.user_id)")
    conn.execute("COMMIT")
    conn.close()


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def ratio_line(name, rps, p99, ratio, goal=None):
    verdict = "" if goal is None else f"  goal >= {goal:.2f}: {'met' if ratio >= goal else 'MISSED'}"
    print(f"  {name:<34} {rps:8.0f} req/s  p99 {p99:7.1f} ms  {ratio:5.2f} of ceiling{verdict}")


def throughput(args, cpus):
    print(f"\n1. Throughput, {args.connections} connections, {args.seconds} s a run; each case"
          f" alternates with the ceiling {args.rounds} times, the medians shown")
    server_cpu, client_cpu = cpus
    ceiling_server = Server("ceiling", cpu=server_cpu)
    ceiling_url = ceiling_server.url + "/ping"

    def measure(url, cookie=None, post=None):
        """Median requests/s, median p99, and the median ratio to the ceiling run just before."""
        runs = []
        for _ in range(args.rounds):
            ceiling = load(ceiling_url, args.seconds, args.connections, cpu=client_cpu)[0]
            rps, p99 = load(url, args.seconds, args.connections, cookie, post, client_cpu)
            runs.append((rps, p99, rps / ceiling, ceiling))
        return [statistics.median(column) for column in zip(*runs)]

    ceiling, p99, _, _ = measure(ceiling_url)
    ratio_line("ceiling: bare Bottle JSON route", ceiling, p99, 1.0)
    results = {}
    for synchronous in ("NORMAL", "FULL"):
        workdir = tempfile.mkdtemp(prefix="messenger-perf-")
        server = Server("messenger", os.path.join(workdir, "perf.db"), synchronous, server_cpu)
        cookie, chat_id = small_world(server)
        send = {"text": "benchmark"}
        cases = [("POST /chats/{id}/messages", f"/chats/{chat_id}/messages", cookie, send, 0.38)]
        if synchronous == "NORMAL":
            reacted = reacted_history(server, cookie)
            member, groups, owner, _ = group_world(server)
            page = "/chats/{}/messages?limit=50"
            cases = [("GET /users", "/users", cookie, None, 0.80),
                     ("GET /chats (20 dialogs)", "/chats", cookie, None, 0.60),
                     ("GET /chats (20 dialogs, 5 groups)", "/chats", member, None, 0.55),
                     ("GET 50-message history page", page.format(chat_id), cookie, None, 0.55),
                     ("  the same, a third with reactions", page.format(reacted), cookie, None, 0.55),
                     *cases,
                     ("  the same to a 10-member group", f"/chats/{groups[10]}/messages", owner, send,
                      0.30),
                     ("  the same to a 100-member group", f"/chats/{groups[100]}/messages", owner, send,
                      0.30)]
        for name, path, who, post, goal in cases:
            rps, p99, ratio, _ = measure(server.url + path, who, post)
            label = name if synchronous == "NORMAL" else name + " (synchronous=FULL)"
            ratio_line(label, rps, p99, ratio, goal if synchronous == "NORMAL" else None)
            results[label] = rps
        server.stop()
        shutil.rmtree(workdir)
    ceiling_server.stop()
    full = results["POST /chats/{id}/messages (synchronous=FULL)"] / results["POST /chats/{id}/messages"]
    flat = results["  the same to a 100-member group"] / results["  the same to a 10-member group"]
    print(f"  a 100-member group send runs at {flat:.2f} of a 10-member one's rate (goal: flat, about 1)")
    print(f"  synchronous=FULL keeps {full:.2f} of the sends per second of NORMAL")


def scaling(args, cpus):
    users, dialogs, messages = (100_000, 1_000, 100_000) if args.quick else (1_000_000, 10_000, 1_000_000)
    print(f"\n2. Cost as data grows: {users:,} users, {dialogs:,} dialogs, {messages:,} messages")
    workdir = tempfile.mkdtemp(prefix="messenger-perf-")
    started = time.monotonic()
    big_world(os.path.join(workdir, "big.db"), users, dialogs, messages)
    print(f"  generated in {time.monotonic() - started:.1f} s")
    big_world(os.path.join(workdir, "small.db"), 21, 20, 20 * 60)
    server_cpu, client_cpu = cpus
    timings = {}
    for size in ("small", "big"):
        server = Server("messenger", os.path.join(workdir, f"{size}.db"), cpu=server_cpu)
        _, cookie = server.login("u1@example.com", register=False)
        for name, path in (("GET /chats", "/chats"), ("history page", "/chats/1/messages?limit=50")):
            rps, p99 = load(server.url + path, args.seconds, args.connections, cookie, cpu=client_cpu)
            timings[size, name] = (rps, p99)
        if size == "big":
            search_medians(server, cookie, os.path.join(workdir, "big.db"), args)
        server.stop()
    for name in ("GET /chats", "history page"):
        (small_rps, _), (big_rps, big_p99) = timings["small", name], timings["big", name]
        cost = small_rps / big_rps
        print(f"  {name:<14} near-empty {small_rps:7.0f} req/s, large {big_rps:7.0f} req/s"
              f" (p99 {big_p99:.1f} ms): {cost:.2f}x the time; goal <= 1.5x:"
              f" {'met' if cost <= 1.5 else 'MISSED'}")
    shutil.rmtree(workdir)


def search_medians(server, cookie, path, args):
    conn = sqlite3.connect(path)
    usernames = [row[0] for row in conn.execute("SELECT username FROM users ORDER BY random() LIMIT 200")]
    conn.close()
    rng = random.Random(3)
    for length in (3, 4, 6):
        queries = []
        for username in usernames:
            start = rng.randrange(max(1, len(username) - length))
            queries.append(username[start:start + length])
        seconds = []
        for query in queries:
            started = time.perf_counter()
            status, body, _ = server.call("GET", "/users/" + query, cookie=cookie)
            seconds.append(time.perf_counter() - started)
            assert status == 200, body
        median = statistics.median(seconds) * 1000
        print(f"  search, {length}-character queries: median {median:.2f} ms,"
              f" p90 {sorted(seconds)[int(len(seconds) * 0.9)] * 1000:.2f} ms"
              f" (goal for 3+ characters: median <= 5 ms: {'met' if median <= 5 else 'MISSED'})")


def privacy(args, cpus):
    """What an outsider can learn from a search's time, and one user's waiting share."""
    print("\n6. Privacy and fairness")
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, "privacy.db")
    messages = 5000 if args.quick else 20000
    app = messenger.make_app(path, password_iterations=BENCH_ITERATIONS)
    password_hash = messenger.hash_password(PASSWORD, BENCH_ITERATIONS)
    with app.db.transaction() as conn:
        ids = [messenger._insert_user(conn, f"{name}@example.com", name, password_hash)
               for name in ("ann", "bob", "carol", "outsider", "friend")]
        group = messenger._insert_chat(conn, "Secret", ids[:3], "2026-01-01T00:00:00.000Z")
        conn.executemany("INSERT INTO messages (chat_id, author_id, text, created_at) VALUES (?, ?, ?, ?)",
                         [(group, ids[n % 3], f"the bluefish number {n} swims" if n % 2 else f"note {n}",
                           "2026-01-01T00:00:00.000Z") for n in range(messages)])
        dialog = messenger._insert_chat(conn, None, ids[3:], "2026-01-01T00:00:00.000Z")
        for n in range(50):
            messenger._insert_message(conn, dialog, ids[3], f"hello {n}", "2026-01-01T00:00:00.000Z")
    app.db.close()
    server = Server("messenger", db=path, cpu=cpus[0])
    _, ann = server.login("ann@example.com", register=False)
    _, outsider = server.login("outsider@example.com", register=False)
    server.call("GET", "/messages?query=bluefish", cookie=ann)  # the members' search indexes the group
    medians = {}
    for query in ["bluef", "bluez"] * 2:  # alternated
        seconds = []
        for _ in range(100):
            started = time.perf_counter()
            status, body, _ = server.call("GET", f"/messages?query={query}", cookie=outsider)
            seconds.append(time.perf_counter() - started)
            assert status == 200 and body["messages"] == [], body
        medians.setdefault(query, []).append(statistics.median(seconds) * 1000)
    word, absent = (statistics.median(medians[q]) for q in ("bluef", "bluez"))
    print(f"  an outsider's message search ({messages:,} messages in a group they are not in, half of"
          f" them with 'bluefish'): 'bluef' median {word:.2f} ms, 'bluez' median {absent:.2f} ms"
          f" ({word / absent:.2f}x; goal: the same within noise)")
    server.stop()

    server = Server("messenger", db=":memory:", cpu=cpus[0], threads=16)
    _, greedy = server.login("greedy@example.com")
    _, other = server.login("other@example.com")
    results = []

    def wait(cookie, seconds):
        started = time.monotonic()
        server.call("GET", f"/updates?offset=1000000&timeout={seconds}", cookie=cookie)
        results.append((cookie, time.monotonic() - started))

    threads = [threading.Thread(target=wait, args=(greedy, 3)) for _ in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    wait(other, 1)
    for thread in threads:
        thread.join()
    greedy_waited = sum(1 for cookie, seconds in results if cookie == greedy and seconds > 2)
    other_waited = [seconds for cookie, seconds in results if cookie == other][0]
    print(f"  one user opening 12 long polls (16 threads): {greedy_waited} of them wait (goal: 4),"
          f" {12 - greedy_waited} answer at once; another user's 1 s poll still waits"
          f" {other_waited:.2f} s (goal: about 1 s)")
    server.stop()
    shutil.rmtree(workdir)


def _rss_mib(pid, field="VmRSS"):
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read())[1]) / 1024


def _upload(server, cookie, data):
    """POST /files with one 10 MiB part; the file object."""
    boundary = "bench-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection(server.host, int(server.port), timeout=120)
    connection.request("POST", "/files", body, {"Cookie": cookie,
                                                "Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = connection.getresponse()
    file = json.loads(response.read())
    connection.close()
    assert response.status == 200, file
    return file


def _download(server, cookie, url):
    """GET a file: (its bytes, seconds from the request to the last byte)."""
    connection = http.client.HTTPConnection(server.host, int(server.port), timeout=120)
    started = time.perf_counter()
    connection.request("GET", url, headers={"Cookie": cookie})
    response = connection.getresponse()
    data = response.read()
    seconds = time.perf_counter() - started
    connection.close()
    assert response.status == 200
    return data, seconds


def files(args, cpus):
    """Memory and speed of 10 MiB uploads and downloads, on a database file."""
    print("\n7. Files (10 MiB, a database file)")
    workdir = tempfile.mkdtemp()
    server = Server("messenger", db=os.path.join(workdir, "files.db"), cpu=cpus[0])
    clients = [server.login(f"user{n}@example.com")[1] for n in range(8)]
    datas = [os.urandom(messenger.MAX_FILE_BYTES) for _ in clients]
    file = _upload(server, clients[0], datas[0])  # warm up: the first upload and download
    _download(server, clients[0], file["url"])
    before = _rss_mib(server.process.pid)
    failures = []

    def round_trip(n):
        data, _ = _download(server, clients[n], _upload(server, clients[n], datas[n])["url"])
        if data != datas[n]:
            failures.append(n)

    threads = [threading.Thread(target=round_trip, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = _rss_mib(server.process.pid, "VmHWM")
    assert not failures, failures
    print(f"  8 clients each uploading then downloading 10 MiB at once: server RSS {before:.1f} MiB before,"
          f" peak {peak:.1f} MiB: +{peak - before:.1f} MiB (goal < 64 MiB:"
          f" {'met' if peak - before < 64 else 'MISSED'})")
    rates = []
    for _ in range(5 if args.quick else 20):
        data, seconds = _download(server, clients[0], file["url"])
        rates.append(len(data) / seconds / 1024 / 1024)
    rate = statistics.median(rates)
    print(f"  one download of 10 MiB: median {rate:.0f} MiB/s of {len(rates)}, best {max(rates):.0f}"
          f" (goal >= 100 MiB/s: {'met' if rate >= 100 else 'MISSED'})")
    server.stop()
    shutil.rmtree(workdir)


def _in_process_updates(tries):
    """Microseconds of GET /updates answering 100 updates, the WSGI app called in this process."""
    import wsgiref.util
    app = messenger.make_app(":memory:", password_iterations=BENCH_ITERATIONS, quiet=True)
    cookies = []
    for name in ("ann", "bob", "carol"):
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/users"}
        _wsgi(app, environ, {"email": f"{name}@example.com", "password": PASSWORD})
        headers = _wsgi(app, {"REQUEST_METHOD": "POST", "PATH_INFO": "/login"},
                        {"email": f"{name}@example.com", "password": PASSWORD})[1]
        cookies.append(dict(headers)["Set-Cookie"].split(";")[0])
    ann, bob, carol = cookies
    dialog = json.loads(_wsgi(app, {"REQUEST_METHOD": "POST", "PATH_INFO": "/chats"}, {"user_id": 2}, ann)[2])
    group = json.loads(_wsgi(app, {"REQUEST_METHOD": "POST", "PATH_INFO": "/chats"},
                             {"name": "Trip", "member_ids": [2, 3]}, ann)[2])
    for n in range(60):
        chat, who = (dialog, bob) if n % 2 else (group, carol)
        _wsgi(app, {"REQUEST_METHOD": "POST", "PATH_INFO": f"/chats/{chat['id']}/messages"},
              {"text": MESSAGES[n % 4]}, who)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/updates", "QUERY_STRING": "limit=100"}
    wsgiref.util.setup_testing_defaults(environ)
    body = json.loads(_wsgi(app, dict(environ), None, ann)[2])
    assert len(body["updates"]) == 62, len(body["updates"])  # two chats, 60 messages
    for n in range(40):  # reactions of Bob and Carol to 20 of the group's messages, to make it 100
        path = f"/chats/{group['id']}/messages/{n % 20 * 2 + 1}/reaction"
        _wsgi(app, {"REQUEST_METHOD": "PUT", "PATH_INFO": path}, {"emoji": "👍"}, bob if n < 20 else carol)
    assert len(json.loads(_wsgi(app, dict(environ), None, ann)[2])["updates"]) == 100
    seconds = []
    for _ in range(tries):
        started = time.perf_counter()
        _wsgi(app, dict(environ), None, ann)
        seconds.append(time.perf_counter() - started)
    app.db.close()
    return statistics.median(seconds) * 1e6


def _wsgi(app, environ, body=None, cookie=None):
    """Call a WSGI app in this process: (status, headers, body bytes)."""
    import io
    import wsgiref.util
    data = b"" if body is None else json.dumps(body).encode()
    environ = dict(environ, CONTENT_LENGTH=str(len(data)))
    environ["wsgi.input"] = io.BytesIO(data)
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    wsgiref.util.setup_testing_defaults(environ)
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer.update(status=status, headers=headers)

    out = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], out


def feed(args, cpus):
    """How a send wakes the polls that wait: only its recipients, and all of them soon."""
    print("\n8. The feed: waking waiting polls (136 threads)")
    server = Server("messenger", db=":memory:", cpu=cpus[0], threads=136)
    _, groups, owner, members = group_world(server, sizes=(100,), groups=0)
    offsets = [server.call("GET", "/updates", cookie=cookie)[1]["updates"][-1]["update_id"] + 1
               for cookie in members]
    delays = []

    def wait(n, ready, woken):
        connection = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
        connection.request("GET", f"/updates?timeout=30&offset={offsets[n]}", headers={"Cookie": members[n]})
        ready.wait()
        updates = json.loads(connection.getresponse().read())["updates"]
        woken.append(time.perf_counter())
        offsets[n] = updates[-1]["update_id"] + 1
        connection.close()

    for _ in range(5 if args.quick else 20):
        woken, ready = [], threading.Barrier(len(members) + 1)
        threads = [threading.Thread(target=wait, args=(n, ready, woken)) for n in range(len(members))]
        for thread in threads:
            thread.start()
        ready.wait()
        time.sleep(0.3)  # every poll is waiting in the server
        sent = time.perf_counter()
        server.call("POST", f"/chats/{groups[100]}/messages", {"text": "wake up, all"}, owner)
        for thread in threads:
            thread.join()
        delays += [at - sent for at in woken]
    delays.sort()
    p99 = delays[int(len(delays) * 0.99)] * 1000
    print(f"  a send to a 100-member group, every member's long poll waiting: the 99th of"
          f" {len(delays)} wake-ups after {p99:.1f} ms, median {statistics.median(delays) * 1000:.1f}"
          f" (goal p99 <= 100 ms: {'met' if p99 <= 100 else 'MISSED'})")

    me, me_cookie = server.login("dialog-a@example.com")
    other, _ = server.login("dialog-b@example.com")
    chat_id = server.call("POST", "/chats", {"user_id": other}, me_cookie)[1]["id"]
    url, post = f"{server.url}/chats/{chat_id}/messages", {"text": "benchmark"}
    quiet_rps = load(url, args.seconds, args.connections, me_cookie, post, cpus[1])[0]
    stop = threading.Event()

    def keep_waiting(cookie):
        while not stop.is_set():
            server.call("GET", "/updates?timeout=5&offset=1000000000", cookie=cookie)

    waiters = [threading.Thread(target=keep_waiting, args=(cookie,)) for cookie in members]
    for thread in waiters:
        thread.start()
    time.sleep(1)
    busy_rps = load(url, args.seconds, args.connections, me_cookie, post, cpus[1])[0]
    stop.set()
    for thread in waiters:
        thread.join()
    cost = quiet_rps / busy_rps
    print(f"  a dialog send with 100 unrelated users waiting: {busy_rps:.0f} req/s, against {quiet_rps:.0f}"
          f" with none: {cost:.2f}x the cost (goal <= 1.2x: {'met' if cost <= 1.2 else 'MISSED'})")
    server.stop()
    micros = _in_process_updates(200 if args.quick else 1000)
    print(f"  GET /updates answering 100 updates, in-process: median {micros:.0f} us"
          f" (goal <= 300 us: {'met' if micros <= 300 else 'MISSED'})")


def resets(args, cpus):
    """Server.reset() on the demo's data, as a client's test suite calls it before every test."""
    print("\n9. Server.reset(), the demo's data")
    workdir = tempfile.mkdtemp()
    for db in (os.path.join(workdir, "reset.db"), ":memory:"):
        with messenger.Server(db=db, demo=True, quiet=True) as server:  # the real password cost, paid once
            seconds = []
            for _ in range(20 if args.quick else 200):
                started = time.perf_counter()
                server.reset()
                seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds) * 1000
        print(f"  on {'a file' if db != ':memory:' else ':memory:'}: median {median:.1f} ms, slowest"
              f" {max(seconds) * 1000:.1f} ms of {len(seconds)} (goal: median <= 20 ms:"
              f" {'met' if median <= 20 else 'MISSED'})")
    shutil.rmtree(workdir)


def startup():
    print("\n3. Start-up and idle memory")
    times, rss = [], []
    for _ in range(5):
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "messenger.py"),
                                    "--port", "0", "--db", ":memory:", "--quiet"],
                                   stdout=subprocess.PIPE, text=True)
        url = re.search(r"http://\S+?(?=/ )", process.stdout.readline())[0]
        host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "/")
        connection.getresponse().read()
        times.append(time.monotonic() - started)
        time.sleep(0.5)
        with open(f"/proc/{process.pid}/status") as f:
            rss.append(int(re.search(r"VmRSS:\s+(\d+)", f.read())[1]) / 1024)
        process.terminate()
        process.wait(timeout=10)
    median = statistics.median(times)
    print(f"  launch to first answer: median {median * 1000:.0f} ms of 5 (goal <= 300 ms:"
          f" {'met' if median <= 0.3 else 'MISSED'})")
    print(f"  idle RSS: {statistics.median(rss):.1f} MiB (goal <= 35 MiB:"
          f" {'met' if statistics.median(rss) <= 35 else 'MISSED'})")


def wake_up(tries):
    print(f"\n4. Long-poll and event-stream wake-up, {tries} tries")
    server = Server("messenger")
    _, ann = server.login("ann@example.com")
    bob_id, bob = server.login("bob@example.com")
    chat_id = server.call("POST", "/chats", {"user_id": bob_id}, ann)[1]["id"]
    offset = server.call("GET", "/updates", cookie=ann)[1]["updates"][-1]["update_id"] + 1
    delays = []
    for _ in range(tries):
        answer = {}

        def poll(answer, offset):
            answer["body"] = server.call("GET", f"/updates?timeout=10&offset={offset}", cookie=ann)[1]
            answer["at"] = time.perf_counter()

        thread = threading.Thread(target=poll, args=(answer, offset))
        thread.start()
        time.sleep(0.02)
        sent = time.perf_counter()
        server.call("POST", f"/chats/{chat_id}/messages", {"text": "wake up"}, bob)
        thread.join()
        delays.append(answer["at"] - sent)
        offset = answer["body"]["updates"][-1]["update_id"] + 1
    delays.sort()
    median, p99 = statistics.median(delays) * 1000, delays[int(len(delays) * 0.99)] * 1000
    print(f"  from posting to the poll's return: median {median:.1f} ms, p99 {p99:.1f} ms"
          f" (goals 20 ms and 100 ms: {'met' if median <= 20 and p99 <= 100 else 'MISSED'})")
    stream_delays = stream_delay(server, ann, bob, chat_id, offset, tries)
    server.stop()
    median = statistics.median(stream_delays) * 1000
    p99 = stream_delays[int(len(stream_delays) * 0.99)] * 1000
    print(f"  from posting to the event on an open stream: median {median:.1f} ms, p99 {p99:.1f} ms"
          f" (goal: median 20 ms: {'met' if median <= 20 else 'MISSED'})")


def stream_delay(server, ann, bob, chat_id, offset, tries):
    """Seconds from each of `tries` posts to its event arriving on an open GET /updates/stream."""
    connection = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    connection.request("GET", f"/updates/stream?offset={offset}", headers={"Cookie": ann})
    stream = connection.getresponse()
    stream.readline()  # the retry: line
    delays = []
    for _ in range(tries):
        sent = time.perf_counter()
        server.call("POST", f"/chats/{chat_id}/messages", {"text": "wake up"}, bob)
        while not stream.readline().startswith(b"data: "):
            pass
        delays.append(time.perf_counter() - sent)
    connection.close()
    return sorted(delays)


def pinning(args):
    print("\n5. Two cores: 64 connections, server pinned to one core or free on all")
    for label, cpu in (("pinned", 0), ("unpinned", None)):
        for name, kind, path in (("ceiling", "ceiling", "/ping"), ("GET /users", "messenger", "/users")):
            server = Server(kind, cpu=cpu)
            cookie = server.login("me@example.com")[1] if kind == "messenger" else None
            rps, p99 = load(server.url + path, args.seconds, 64, cookie)
            server.stop()
            print(f"  {label:<9} {name:<11} {rps:8.0f} req/s  p99 {p99:8.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, shorter runs")
    parser.add_argument("--seconds", type=int, default=None, help="length of each load run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="how often each throughput case alternates with the ceiling")
    parser.add_argument("--only", action="append", choices=list(SECTIONS),
                        help="run only this section (repeatable)")
    parser.add_argument("--serve", choices=["ceiling", "messenger"], help=argparse.SUPPRESS)
    parser.add_argument("--db", default=":memory:", help=argparse.SUPPRESS)
    parser.add_argument("--synchronous", default="NORMAL", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.db, args.synchronous, args.cpu, args.threads)
    args.seconds = args.seconds or (3 if args.quick else 5)
    available = sorted(os.sched_getaffinity(0))
    cpus = (available[0], available[1]) if len(available) >= 2 else (None, None)
    client = "wrk" if shutil.which("wrk") else "a Python client (install wrk for better figures)"
    print(f"messenger {messenger.__version__}, Python {sys.version.split()[0]},"
          f" SQLite {sqlite3.sqlite_version}, {os.cpu_count()} cores; load from {client};"
          f" server on core {cpus[0]}, load on core {cpus[1]}")
    for name in args.only or SECTIONS:
        SECTIONS[name](args, cpus)


SECTIONS = {
    "throughput": throughput,
    "scaling": scaling,
    "startup": lambda args, cpus: startup(),
    "wakeup": lambda args, cpus: wake_up(50 if args.quick else 200),
    "pinning": lambda args, cpus: pinning(args),
    "privacy": privacy,
    "files": files,
    "feed": feed,
    "reset": resets,
}


if __name__ == "__main__":
    sys.exit(main())
