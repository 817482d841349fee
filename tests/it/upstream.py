#!/usr/bin/env python3
"""A small upstream app for sidecar-mode tests (Python 3 standard library only).

Run one next to each node: `python3 upstream.py --port N --name X`. It speaks HTTP/1.1 with
keep-alive (the node pools connections), one thread per connection, and answers:

  GET  /health              200 {"status":"ok","name":X}, or 503 after POST /admin/unhealthy
  POST /admin/unhealthy     make /health answer 503       POST /admin/healthy   back to 200
  GET  /admin/stats         {"requests": n, "orders": {id: times served}}
  POST /orders/<id>         200 {"id","body":<json>,"query","servedBy":X,"headers":{...}}
                            (400 {"message"} if the body is not JSON)
  GET  /fail                500 {"message":"upstream failure"}
  GET  /bad                 422 {"message":"bad thing"}; with ?pad=N the message is N bytes longer
                            (of `"` with &quotes=1, each escaped in JSON)
  GET  /sleep?ms=N          sleeps N ms, then 200 {"sleptMs":N,"servedBy":X}
  POST /echo/<id>           201 {"id","servedBy":X,"body":<text>,"headers":{name: [values]}} (every
                            header it got) with Location: /echo/<id>, X-Served-By: X and two
                            Set-Cookie lines, whatever the body
  GET  /locked              401 {"message":"who?"} with WWW-Authenticate, Retry-After: 7 and
                            X-Served-By: X
  GET  /moved               303 to /echo/1 (Location) with X-Served-By: X, no body
  POST /events/<name>       a sidecar subscription delivery (body = the event JSON, with its id
                            in x-event-id, its position in x-event-position, its trace in
                            traceparent and an x-subscription header, else 400, recorded as
                            failed): records the
                            event id and answers 200 {"ok":true,"servedBy":X}; while failing
                            (POST /admin/fail-events) answers 500 and records it as failed instead
  POST /admin/fail-events   make /events/<name> answer 500     POST /admin/ok-events   back to 200
  GET  /events/received     JSON list of the event ids acknowledged with 200 (with duplicates)
  GET  /events/failed       JSON list of the event ids answered 500 (with duplicates)
                            An event whose payload has "hold": true is recorded in
  GET  /events/held         (JSON list, with duplicates) and answered only after
  POST /admin/release       (or after 30 s)
                            One whose payload has "sleepMs": N is answered after N ms.
                            One whose payload has "malformed": true is answered 422
                            {"message":"malformed event"} with X-No-Retry: true (recorded as failed).
  anything else             404 {"message":"no route"}

It prints `listening on HOST:PORT` once it accepts connections (useful with --port 0).
"""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Headers the node is expected to pass on; echoed back so tests can check them.
PASSED_HEADERS = (
    "x-request-id",
    "traceparent",
    "x-principal-id",
    "x-tenant-id",
    "idempotency-key",
    "content-type",
)


class State:
    def __init__(self, name):
        self.name = name
        self.healthy = True
        self.requests = 0
        self.orders = {}
        self.fail_events = False
        self.events_received = []
        self.events_failed = []
        self.events_held = []
        self.released = threading.Event()
        self.lock = threading.Lock()


def make_handler(state, verbose):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length

        def log_message(self, fmt, *args):
            if verbose:
                sys.stderr.write("%s %s\n" % (state.name, fmt % args))

        def send_json(self, status, value):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def read_body(self):
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def handle_any(self, method):
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            raw = self.read_body()
            with state.lock:
                state.requests += 1
            route = (method, url.path)

            if route == ("GET", "/health"):
                if state.healthy:
                    return self.send_json(200, {"status": "ok", "name": state.name})
                return self.send_json(503, {"message": "unhealthy", "name": state.name})
            if route in (("POST", "/admin/unhealthy"), ("POST", "/admin/healthy")):
                state.healthy = url.path == "/admin/healthy"
                return self.send_json(200, {"healthy": state.healthy})
            if route == ("GET", "/admin/stats"):
                with state.lock:
                    return self.send_json(200, {"requests": state.requests, "orders": dict(state.orders)})
            if method == "POST" and url.path.startswith("/orders/") and url.path.count("/") == 2:
                order_id = unquote(url.path[len("/orders/"):])
                try:
                    body = json.loads(raw) if raw.strip() else None
                except ValueError as e:
                    return self.send_json(400, {"message": "body is not JSON: %s" % e})
                with state.lock:
                    state.orders[order_id] = state.orders.get(order_id, 0) + 1
                headers = {h: self.headers.get(h) for h in PASSED_HEADERS if self.headers.get(h) is not None}
                return self.send_json(200, {
                    "id": order_id,
                    "body": body,
                    "query": query,
                    "servedBy": state.name,
                    "headers": headers,
                })
            if route in (("POST", "/admin/fail-events"), ("POST", "/admin/ok-events")):
                with state.lock:
                    state.fail_events = url.path == "/admin/fail-events"
                    return self.send_json(200, {"failEvents": state.fail_events})
            if route == ("GET", "/events/received"):
                with state.lock:
                    return self.send_json(200, list(state.events_received))
            if route == ("GET", "/events/failed"):
                with state.lock:
                    return self.send_json(200, list(state.events_failed))
            if route == ("GET", "/events/held"):
                with state.lock:
                    return self.send_json(200, list(state.events_held))
            if route == ("POST", "/admin/release"):
                state.released.set()
                return self.send_json(200, {"released": True})
            if method == "POST" and url.path.startswith("/events/") and url.path.count("/") == 2:
                try:
                    event = json.loads(raw)
                    event_id = event["id"]
                except (ValueError, KeyError, TypeError) as e:
                    return self.send_json(400, {"message": "body is not an event: %s" % e})
                # The node names the event in headers too (its trace, for middleware).
                traceparent = self.headers.get("traceparent") or ""
                trace_id = event.get("traceId") or ""
                if (self.headers.get("x-event-id") != event_id
                        or not self.headers.get("x-subscription")
                        or self.headers.get("x-event-position") != str(event.get("position"))
                        or (trace_id and not (traceparent.startswith("00-" + trace_id.lower() + "-") and len(traceparent) == 55))):
                    with state.lock:
                        state.events_failed.append(event_id)
                    return self.send_json(400, {"message": "delivery headers missing or not the event's"})
                payload = event.get("payload")
                if isinstance(payload, dict) and payload.get("hold") is True:
                    with state.lock:
                        state.events_held.append(event_id)
                    state.released.wait(30)
                if isinstance(payload, dict) and isinstance(payload.get("sleepMs"), int):
                    time.sleep(min(max(payload["sleepMs"], 0), 30000) / 1000.0)
                if isinstance(payload, dict) and payload.get("malformed") is True:
                    with state.lock:
                        state.events_failed.append(event_id)
                    body = json.dumps({"message": "malformed event"}).encode()
                    self.send_response(422)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("X-No-Retry", "true")
                    self.end_headers()
                    self.wfile.write(body)
                    return None
                with state.lock:
                    failing = state.fail_events
                    (state.events_failed if failing else state.events_received).append(event_id)
                if failing:
                    return self.send_json(500, {"message": "failing events on purpose", "servedBy": state.name})
                return self.send_json(200, {"ok": True, "servedBy": state.name})
            if method == "POST" and url.path.startswith("/echo/") and url.path.count("/") == 2:
                echo_id = unquote(url.path[len("/echo/"):])
                seen = {}
                for name, value in self.headers.items():
                    seen.setdefault(name.lower(), []).append(value)
                body = json.dumps({
                    "id": echo_id,
                    "servedBy": state.name,
                    "body": raw.decode("utf-8", "replace"),
                    "headers": seen,
                }).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Location", "/echo/" + echo_id)
                self.send_header("X-Served-By", state.name)
                self.send_header("Set-Cookie", "a=1")
                self.send_header("Set-Cookie", "b=2")
                self.end_headers()
                self.wfile.write(body)
                return None
            if route == ("GET", "/locked"):
                body = json.dumps({"message": "who?"}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("WWW-Authenticate", 'Bearer realm="orders"')
                self.send_header("Retry-After", "7")
                self.send_header("X-Served-By", state.name)
                self.end_headers()
                self.wfile.write(body)
                return None
            if route == ("GET", "/moved"):
                self.send_response(303)
                self.send_header("Location", "/echo/1")
                self.send_header("X-Served-By", state.name)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if route == ("GET", "/fail"):
                return self.send_json(500, {"message": "upstream failure"})
            if route == ("GET", "/bad"):
                pad = int(query.get("pad", "0") or 0)
                fill = '"' if query.get("quotes") else "x"
                return self.send_json(422, {"message": "bad thing" + fill * pad})
            if route == ("GET", "/sleep"):
                try:
                    ms = int(query.get("ms", "0"))
                except ValueError:
                    return self.send_json(400, {"message": "ms must be an integer"})
                time.sleep(max(ms, 0) / 1000.0)
                return self.send_json(200, {"sleptMs": ms, "servedBy": state.name})
            return self.send_json(404, {"message": "no route for %s %s" % (method, url.path)})

        def do_GET(self):
            self.handle_any("GET")

        def do_POST(self):
            self.handle_any("POST")

        def do_PUT(self):
            self.handle_any("PUT")

        def do_DELETE(self):
            self.handle_any("DELETE")

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args()

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 128  # the default backlog of 5 drops bursts of connects
    server = ThreadingHTTPServer((args.host, args.port), make_handler(State(args.name), args.verbose))
    host, port = server.server_address[:2]
    print("listening on %s:%d" % (host, port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
