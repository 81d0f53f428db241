"""A walhook receiver: verify, record once per webhook-id, answer at once, process in the background.

Standard library and the official Standard Webhooks library only (pip install standardwebhooks).
Settings from the environment: WEBHOOK_SECRET (the endpoint's whsec_...), PORT (3000; 0 picks a free
one), INBOX (the SQLite file that records each event once, inbox.sqlite3), EVENTS_LOG (where the
stand-in for your work appends "webhook-id type" per processed event, events.log).
"""

import json
import os
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

SECRET = os.environ["WEBHOOK_SECRET"]
INBOX = os.environ.get("INBOX", "inbox.sqlite3")
EVENTS_LOG = os.environ.get("EVENTS_LOG", "events.log")

webhook = Webhook(SECRET)
wake_worker = threading.Event()


def inbox():
    return sqlite3.connect(INBOX, timeout=10)


def create_inbox():
    with inbox() as db:
        db.execute("pragma journal_mode = wal")
        db.execute(
            "create table if not exists inbox ("
            " webhook_id text primary key,"  # the unique constraint that deduplicates
            " type text not null,"
            " body text not null,"
            " received_at text not null default current_timestamp,"
            " processed_at text)"
        )


def record(webhook_id, event, body):
    """Records a verified event unless its webhook-id is already in the inbox; True if it was new."""
    with inbox() as db:  # commits on success
        inserted = db.execute(
            "insert into inbox (webhook_id, type, body) values (?, ?, ?)"
            " on conflict (webhook_id) do nothing",
            (webhook_id, event["type"], body.decode()),
        ).rowcount
    return inserted == 1


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/webhooks":
            return self.answer(404, "not found")
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            # checks the timestamp (5 minutes) and every "v1," signature in the header: during a
            # secret rotation walhook sends one per valid secret, so the old and the new one both verify
            event = webhook.verify(body, headers)
        except (WebhookVerificationError, ValueError) as error:
            return self.answer(401, f"invalid webhook: {error}")
        try:
            if record(headers["webhook-id"], event, body):
                wake_worker.set()
        except sqlite3.Error as error:
            # not recorded: ask walhook to come back later (429 and 503 honour Retry-After)
            print(f"inbox unavailable: {error}", file=sys.stderr)
            return self.answer(503, "try again later", retry_after=30)
        # a duplicate gets 2xx too: it is already recorded, so walhook can stop sending it
        self.answer(204)

    def answer(self, status, text="", retry_after=None):
        self.send_response(status)
        if retry_after is not None:
            self.send_header("retry-after", str(retry_after))
        self.send_header("content-length", str(len(text.encode())))
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *args):
        pass


def process(webhook_id, event):
    """Your work goes here: one call per event, in the order the events were received."""
    kind, data = event["type"], event["data"]
    if kind == "walhook.endpoint.disabled":
        reason = data["reason"] or "no reason given"
        print(f"ALERT endpoint {data['endpoint_id']} disabled ({data['cause']}): {reason}", file=sys.stderr)
    elif kind == "walhook.delivery.dead":
        print(f"ALERT {data['event_type']} {data['webhook_id']} to endpoint {data['endpoint_id']} dead after"
              f" {data['attempts']} attempts: {data['last_error']}", file=sys.stderr)
    elif kind.startswith("walhook."):
        print(f"walhook: {kind} {json.dumps(data)}", file=sys.stderr)
    with open(EVENTS_LOG, "a") as log:
        log.write(f"{webhook_id} {kind}\n")


def work():
    """Processes recorded events oldest first, those a previous run left unprocessed included; an event
    whose processing fails stays in the inbox and is tried again a minute later."""
    db = inbox()
    while True:
        wake_worker.clear()
        rows = db.execute(
            "select webhook_id, body from inbox where processed_at is null order by rowid"
        ).fetchall()
        for webhook_id, body in rows:
            try:
                process(webhook_id, json.loads(body))
            except Exception as error:
                print(f"processing {webhook_id} failed, to be tried again: {error!r}", file=sys.stderr)
                continue
            with db:
                db.execute(
                    "update inbox set processed_at = current_timestamp where webhook_id = ?",
                    (webhook_id,),
                )
        wake_worker.wait(timeout=60)  # returns at once if an event came in meanwhile


if __name__ == "__main__":
    create_inbox()
    threading.Thread(target=work, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "3000"))), Handler)
    print(f"listening on http://127.0.0.1:{server.server_port}/webhooks", flush=True)
    server.serve_forever()
