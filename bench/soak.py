"""Soak test: a real messenger server under a realistic mix of clients, then an audit.

    python bench/soak.py                 # 16 clients for 30 seconds
    python bench/soak.py --seconds 10 --clients 8

It starts `python messenger.py` on a free port of 127.0.0.1 with a fresh
database file, logs in one user per client, gives each client a dialog with
the next one, and lets every client loop on a mix of requests (list chats,
page history, send, long poll, look up a user) until the time is up or the
request budget is spent. Then it reads every chat back and checks that each
acknowledged message is stored exactly once. It prints throughput, latency,
status codes and the server's resident memory six times over the run,
and exits 1 if any answer was a 5xx or a message was lost or duplicated.
"""

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
MESSENGER = os.path.join(HERE, "..", "messenger.py")
PASSWORD = "soak password"
MAX_REQUESTS_PER_CLIENT = 50_000
MIX = [("list_chats", 30), ("history", 25), ("send", 25), ("poll", 10), ("user", 10)]


def rss_kib(pid):
    """Resident memory of a process, in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read())[1])


class Client:
    """One user on one keep-alive connection."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.connection = http.client.HTTPConnection(host, port, timeout=30)
        self.cookie = None

    def call(self, method, path, body=None):
        """(status, JSON body); reconnects once if the keep-alive connection was closed."""
        data = None if body is None else json.dumps(body)
        headers = {"Cookie": self.cookie} if self.cookie else {}
        for attempt in (1, 2):
            try:
                self.connection.request(method, path, data, headers)
                response = self.connection.getresponse()
                payload = response.read()
                if response.getheader("Set-Cookie"):
                    self.cookie = response.getheader("Set-Cookie").split(";")[0]
                return response.status, json.loads(payload) if payload else None
            except (http.client.HTTPException, ConnectionError):
                self.connection.close()
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt == 2:
                    raise


def start_server(db, threads):
    process = subprocess.Popen(
        [sys.executable, MESSENGER, "--port", "0", "--db", db, "--quiet", "--threads", str(threads)],
        stdout=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    host, port = re.search(r"http://([\d.]+):(\d+)", line).groups()
    return process, host, int(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16, help="the server's worker threads")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="messenger-soak-")
    process, host, port = start_server(os.path.join(workdir, "soak.db"), args.threads)
    try:
        clients = [Client(host, port) for _ in range(args.clients)]
        ids = []
        for n, client in enumerate(clients):
            email = f"soak{n}@example.com"
            client.call("POST", "/users", {"email": email, "password": PASSWORD})
            status, user = client.call("POST", "/login", {"email": email, "password": PASSWORD})
            assert status == 200, (status, user)
            ids.append(user["id"])
        chats = [client.call("POST", "/chats", {"user_id": ids[(n + 1) % len(ids)]})[1]["id"]
                 for n, client in enumerate(clients)]
        partners = defaultdict(list)  # client index -> its chats
        for n, chat_id in enumerate(chats):
            partners[n].append(chat_id)
            partners[(n + 1) % len(clients)].append(chat_id)

        statuses, latencies = Counter(), defaultdict(list)
        acknowledged = defaultdict(list)  # chat id -> message ids the server acknowledged
        failures = []
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds

        def run(n, client):
            rng = random.Random(n)
            offset = 0
            kinds, weights = zip(*MIX)
            for count in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() > deadline:
                    return
                kind = rng.choices(kinds, weights)[0]
                chat_id = rng.choice(partners[n])
                started = time.perf_counter()
                try:
                    if kind == "list_chats":
                        status, body = client.call("GET", "/chats")
                    elif kind == "history":
                        status, body = client.call("GET", f"/chats/{chat_id}/messages?limit=50")
                    elif kind == "send":
                        status, body = client.call("POST", f"/chats/{chat_id}/messages",
                                                   {"text": f"message {count} from {n}"})
                    elif kind == "poll":
                        status, body = client.call("GET", f"/updates?offset={offset}&timeout=1")
                        if status == 200 and body["updates"]:
                            offset = body["updates"][-1]["update_id"] + 1
                    else:
                        status, body = client.call("GET", f"/users/{rng.choice(ids)}")
                except Exception as exc:  # counted and reported, never hidden
                    with lock:
                        failures.append(f"{kind}: {exc!r}")
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[status] += 1
                    latencies[kind].append(elapsed)
                    if kind == "send" and status == 200:
                        acknowledged[chat_id].append(body["id"])

        memory = [(0, rss_kib(process.pid))]
        threads = [threading.Thread(target=run, args=(n, client)) for n, client in enumerate(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for sample in range(1, 7):  # the server's memory, six times over the run
            time.sleep(max(0.0, started + args.seconds * sample / 6 - time.monotonic()))
            memory.append((time.monotonic() - started, rss_kib(process.pid)))
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started

        lost = duplicated = 0
        for n, client in enumerate(clients):
            for chat_id in partners[n][:1]:  # each chat once, through its creator
                stored, after = [], 0
                while True:
                    status, body = client.call("GET", f"/chats/{chat_id}/messages?limit=100&after={after}")
                    stored += [m["id"] for m in body["messages"]]
                    if not body["has_more"]:
                        break
                    after = stored[-1]
                duplicated += len(stored) - len(set(stored))
                lost += len(set(acknowledged[chat_id]) - set(stored))
    finally:
        process.terminate()
        exit_status = process.wait(timeout=30)

    total = sum(statuses.values())
    errors_5xx = sum(count for status, count in statuses.items() if status >= 500)
    print(f"soak: {args.clients} clients, {args.threads} server threads, {elapsed:.1f} s, "
          f"{total} requests, {total / elapsed:.0f} requests/s")
    print("statuses:", dict(sorted(statuses.items())), "| client errors:", len(failures))
    for kind, values in sorted(latencies.items()):
        values.sort()
        print(f"  {kind:<10} {len(values):>7} requests  median {statistics.median(values) * 1000:7.1f} ms"
              f"  p99 {values[int(len(values) * 0.99)] * 1000:7.1f} ms")
    sent = sum(len(v) for v in acknowledged.values())
    print(f"messages: {sent} acknowledged, {lost} lost, {duplicated} duplicated")
    print("server RSS:", ", ".join(f"{at:.0f} s {kib / 1024:.1f} MiB" for at, kib in memory))
    print("server exit status after SIGTERM:", exit_status)
    for failure in failures[:5]:
        print("  client error:", failure)
    ok = errors_5xx == 0 and lost == 0 and duplicated == 0 and not failures and exit_status == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
