"""A fault-injecting HTTP proxy for the S3 test server: python faultproxy.py PORT UPSTREAM_URL

The faults are chosen per bucket (the first segment of the request path), from its name, so
tests running at once each get their own schedule:
- a bucket named `...-f<N>-...` (e.g. `clvflow-f5-1a2b`) gets a fault on N % of its requests,
  drawn from a generator seeded with the bucket name (less a trailing uuid): a 503 "SlowDown" answer; a stall then a
  dropped connection before the request reaches the server; the request forwarded and its
  answer dropped (a write that landed without the client knowing); or the answer's body cut off
  half-way (a GET or LIST body that breaks while streaming);
- a bucket named `...-lost-...` gets the first create-only PUT (If-None-Match) and the first
  update PUT (If-Match) to each key forwarded and its answer dropped (counted as `lost_answer`
  and `lost_update_answer`);
- any other bucket is forwarded untouched.
The proxy counts what it injected: GET /_faults answers {"bucket": {"kind": n, ...}, ...}.
"""
import http.client, json, random, re, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

port, upstream = int(sys.argv[1]), urlparse(sys.argv[2])
lock = threading.Lock()
rngs, injected, lost_seen = {}, {}, set()
FAULTS = ["503", "drop_before", "lost_answer", "cut_body"]


def bucket_of(path):
    return path.lstrip("/").split("/", 1)[0].split("?", 1)[0]


def choose(bucket, method, headers, path):
    """The fault for this request, or None."""
    create = method == "PUT" and headers.get("If-None-Match")
    update = method == "PUT" and headers.get("If-Match")
    if "-lost-" in bucket:
        key = (path.split("?", 1)[0], bool(update))
        with lock:
            if (create or update) and key not in lost_seen:
                lost_seen.add(key)
                return "lost_update_answer" if update else "lost_answer"
        return None
    m = re.search(r"-f(\d+)-", bucket)
    if not m:
        return None
    with lock:
        # Seeded with the name less its unique suffix: the same draws in every test run (which
        # request gets which draw still depends on the order the client's tasks send them).
        seed = re.sub(r"-[0-9a-f]{32}$", "", bucket)
        rng = rngs.setdefault(bucket, random.Random(seed))
        if rng.random() * 100 >= int(m.group(1)):
            return None
        return rng.choice(FAULTS)


def count(bucket, fault):
    with lock:
        per = injected.setdefault(bucket, {})
        per[fault] = per.get(fault, 0) + 1


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_any(self):
        if self.path == "/_faults":
            with lock:
                body = json.dumps(injected).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        bucket = bucket_of(self.path)
        fault = choose(bucket, self.command, self.headers, self.path)
        if fault == "cut_body" and self.command not in ("GET",):
            fault = "503"  # only answers with a body can be cut
        if fault:
            count(bucket, fault)
        if fault == "503":
            msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        if fault == "drop_before":
            time.sleep(0.2)
            self.drop()
            return
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        if fault in ("lost_answer", "lost_update_answer"):
            self.drop()
            return
        self.send_response_only(answer.status, answer.reason)
        for k, v in answer.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "cut_body" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.drop()
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), Proxy).serve_forever()
