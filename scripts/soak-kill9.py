#!/usr/bin/env python3
"""A kill -9 soak of a real `tai serve` (README, Development).

Rounds of: start the node on one data dir, drive signed signals from many
client threads (40 tenants, two SKUs, more engines than
`jidoka.max_active_engines`, so engines are passivated all along), then
`kill -9` it at a random moment (now and then SIGINT/SIGTERM instead, or
a kill while it starts up, before any load). Requests whose answer the
kill cut off are retried after the restart, as a client would. At the end
the node is started once more, the retries are finished, the queue is
drained, and it checks:

- every signal answered 202 (or 200 `duplicate`) has exactly one decision
  receipt, and no signal has two;
- each engine's `quota_remaining` is its quota less its `action_generated`
  receipts;
- the ledger verifies, online and offline (`tai receipts --verify --data-dir`);
- no actor crashed (`exited abnormally`) and nothing was dead-lettered as
  poison, in any of the node's logs.

Exit status 0 when every check holds. Standard library only.

    scripts/soak-kill9.py [--tai target/release/tai] [--rounds 30] [--seed N]
                          [--workers 32] [--amqp] [--keep]
"""
import argparse
import glob
import hashlib
import hmac
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

DECISIONS = {"action_generated", "policy_denied", "quota_exceeded", "signal_skipped"}
QUOTA = 1_000_000
ADMIN_TOKEN = "soak-admin-token"

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--tai", default="target/release/tai", help="the tai binary (default: %(default)s)")
ap.add_argument("--rounds", type=int, default=30)
ap.add_argument("--seed", type=int, default=None)
ap.add_argument("--workers", type=int, default=32, help="client threads")
ap.add_argument("--amqp", action="store_true", help="the RabbitMQ backend (127.0.0.1:5672, guest)")
ap.add_argument("--graceful", type=float, default=0.2, help="share of rounds ended by SIGINT/SIGTERM")
ap.add_argument("--keep", action="store_true", help="keep the data dir and logs")
args = ap.parse_args()
seed = args.seed if args.seed is not None else int(time.time())
rng = random.Random(seed)
tai = os.path.abspath(args.tai)
work = tempfile.mkdtemp(prefix=f"tai-soak-{seed}-")
queue = f"tai-soak-{seed}-{os.getpid()}"
print(f"seed {seed}, dir {work}", flush=True)

tenants = [f"t{i}" for i in range(40)]
config = f"""
[node]
mode = "dev"
data_dir = "{work}/data"
shutdown_grace_secs = 10
[ingress]
listen = "127.0.0.1:0"
[ingress.rate_limits]
global_per_sec = 1000000
enterprise_per_sec = 1000000
[operator]
listen = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"
[kanban]
wip_limit = 64
"""
if args.amqp:
    config += f"""backend = "amqp"
amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
amqp_queue = "{queue}"
"""
config += f"""[jidoka]
max_active_engines = 30
[andon]
signing_key_id = "k1"
signing_keys = {{ "k1" = "soak-receipt-key" }}
"""
for sku, policies in [("payments", '["payment_fraud"]'), ("plain", "[]")]:
    config += f"""[skus.{sku}]
policies = {policies}
quota = {QUOTA}
quota_period_secs = 3600
entitlement_timeout_secs = 30
"""
for t in tenants:
    config += f'[[tenants]]\nid = "{t}"\nsecrets = ["{t}-secret"]\ntier = "enterprise"\n'
config_path = f"{work}/soak.toml"
with open(config_path, "w") as f:
    f.write(config)


class Node:
    def __init__(self):
        self.proc = None
        self.starts = 0
        self.ingress = self.operator = None

    def start(self):
        self.starts += 1
        endpoints = f"{work}/data/endpoints.json"
        if os.path.exists(endpoints):
            os.remove(endpoints)
        log = open(f"{work}/node-{self.starts}.log", "w")
        self.proc = subprocess.Popen([tai, "serve", "--config", config_path],
                                     stdout=log, stderr=subprocess.STDOUT)

    def ready(self, deadline=60):
        end = time.time() + deadline
        endpoints = f"{work}/data/endpoints.json"
        while time.time() < end:
            if self.proc.poll() is not None:
                sys.exit(f"the node exited {self.proc.returncode} before it was ready "
                         f"(log {work}/node-{self.starts}.log)")
            try:
                with open(endpoints) as f:
                    e = json.load(f)
                self.ingress, self.operator = e["ingress"], e["operator"]
                return
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        sys.exit("the node did not start within 60 s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig):
        self.proc.send_signal(sig)
        rc = self.proc.wait()
        if rc != 0:
            sys.exit(f"a graceful stop exited {rc} (log {work}/node-{self.starts}.log)")


node = Node()


def conn(addr, timeout=10):
    host, port = addr.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def post(c, tenant, sig):
    body = json.dumps(sig).encode()
    ts = str(int(time.time()))
    mac = hmac.new(f"{tenant}-secret".encode(), f"{ts}\nPOST\n/v1/signals\n".encode() + body,
                   hashlib.sha256)
    c.request("POST", "/v1/signals", body, {
        "X-Tai-Tenant": tenant, "X-Tai-Timestamp": ts,
        "X-Tai-Signature": "v1=" + mac.hexdigest(), "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else {})


def admin(path):
    c = conn(node.operator, timeout=60)
    c.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    r = c.getresponse()
    d = json.loads(r.read())
    c.close()
    return r.status, d


lock = threading.Lock()
accepted = set()  # (tenant, id): answered 202, or 200 duplicate
unknown = {}      # (tenant, id) -> body: the answer was cut off, or 503
counter = [0]
unexpected = []   # answers no client should get


def new_signal():
    with lock:
        counter[0] += 1
        n = counter[0]
        t = rng.choice(tenants)
        sku = rng.choice(["payments", "plain"])
        amount = rng.choice([10, 20, 5000, 20000])
        customer = f"c{rng.randrange(200)}"
    return (t, f"s{n}"), {"id": f"s{n}", "tenant_id": t, "sku_id": sku, "kind": "payment",
                          "payload": {"amount": amount, "currency": "USD", "customer_id": customer}}


def settle(key, status, body):
    with lock:
        if status == 202 or (status == 200 and body.get("duplicate")):
            accepted.add(key)
            unknown.pop(key, None)
        elif status != 503:  # 503: refused for now (draining, full): retried later
            unexpected.append(f"{key}: {status} {body}")
            unknown.pop(key, None)


def client(stop, retries):
    c = conn(node.ingress)
    while not stop.is_set():
        with lock:
            item = retries.pop() if retries else None
        key, body = item if item else new_signal()
        with lock:
            unknown[key] = body
        try:
            status, answer = post(c, key[0], body)
        except (OSError, http.client.HTTPException):
            return  # the node is gone
        settle(key, status, answer)


def cleanup_broker():
    for q in [queue, f"{queue}.deadletter", f"{queue}.deadletter.watch"]:
        subprocess.run(["rabbitmqctl", "delete_queue", q], capture_output=True)
    subprocess.run(["rabbitmqctl", "eval",
                    f'rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, <<"{queue}.deadletter">>), false, <<"soak">>).'],
                   capture_output=True)


def main():
    node.start()
    node.ready()
    c = conn(node.ingress)
    for t in tenants:
        for sku in ["payments", "plain"]:
            st, b = post(c, t, {"id": f"ent-{sku}", "tenant_id": t, "sku_id": sku,
                                "kind": "entitlement", "payload": {"active": True}})
            if st != 202:
                sys.exit(f"entitlement {t}/{sku}: {st} {b}")
    c.close()
    for rnd in range(args.rounds):
        if rnd > 0:
            node.start()
            if rng.random() < 0.25:
                time.sleep(rng.uniform(0.0, 0.4))
                node.kill()
                print(f"round {rnd}: killed while starting", flush=True)
                node.start()
            node.ready()
        stop = threading.Event()
        with lock:
            retries = list(unknown.items())
        threads = [threading.Thread(target=client, args=(stop, retries)) for _ in range(args.workers)]
        for th in threads:
            th.start()
        time.sleep(rng.uniform(0.2, 4.0))
        how = "killed"
        if rng.random() < args.graceful:
            sig = rng.choice([signal.SIGINT, signal.SIGTERM])
            node.stop(sig)
            how = f"stopped ({signal.Signals(sig).name})"
        else:
            node.kill()
        stop.set()
        for th in threads:
            th.join()
        print(f"round {rnd}: {how}; accepted {len(accepted)}, unanswered {len(unknown)}", flush=True)

    node.start()
    node.ready()
    c = conn(node.ingress)
    for key, body in list(unknown.items()):
        for _ in range(100):
            status, answer = post(c, key[0], body)
            if status != 503:
                break
            time.sleep(0.2)
        settle(key, status, answer)
        if key not in accepted:
            unexpected.append(f"the retry of {key}: {status} {answer}")
    # Drained: nothing queued or in flight, twice 1.5 s apart (on amqp the
    # broker's depth is probed every second, and unknown (null) until then).
    end, calm = time.time() + 300, 0
    while calm < 2:
        _, q = admin("/admin/queue")
        idle = q["depth"] == 0 and q["in_flight"] == 0
        if args.amqp:
            b = q["broker"]
            idle = idle and b["connection"] == "connected" and b["broker_depth"] == 0 \
                and b["buffered"] == 0
        calm = calm + 1 if idle else 0
        if time.time() > end:
            sys.exit(f"the queue did not drain in 300 s: {q}")
        time.sleep(1.5 if idle else 0.2)

    receipts, after = [], 0
    while True:
        _, page = admin(f"/admin/receipts?after_seq={after}&limit=1000")
        items = page["receipts"] if isinstance(page, dict) else page
        if not items:
            break
        receipts += items
        after = items[-1]["seq"]
    decided, actions = {}, {}
    for r in receipts:
        if r["kind"] in DECISIONS:
            k = (r["tenant_id"], r["signal_id"])
            decided[k] = decided.get(k, 0) + 1
        if r["kind"] == "action_generated":
            e = (r["tenant_id"], r["sku_id"])
            actions[e] = actions.get(e, 0) + 1
    failures = [f"unexpected answer {u}" for u in unexpected[:10]]
    twice = [k for k, n in decided.items() if n > 1]
    if twice:
        failures.append(f"decided more than once: {len(twice)}, e.g. {twice[:10]}")
    missing = [k for k in accepted if decided.get(k) != 1]
    if missing:
        failures.append(f"accepted but not decided once: {len(missing)}, e.g. {missing[:10]}")
    for (t, sku), n in sorted(actions.items()):
        _, e = admin(f"/admin/tenants/{t}/{sku}")
        if e.get("quota_remaining") != QUOTA - n:
            failures.append(f"{t}/{sku}: quota_remaining {e.get('quota_remaining')}, {n} actions")
    _, v = admin("/admin/receipts/verify")
    if not v.get("ok") or v.get("count") != len(receipts):
        failures.append(f"online verification: {v} ({len(receipts)} receipts listed)")
    node.stop(signal.SIGINT)
    off = subprocess.run([tai, "receipts", "--verify", "--data-dir", f"{work}/data",
                          "--config", config_path], capture_output=True, text=True)
    if off.returncode != 0:
        failures.append(f"offline verification: {off.stdout.strip()} {off.stderr.strip()[-300:]}")
    logs = [open(f).read() for f in glob.glob(f"{work}/node-*.log")]
    crashes = sum(log.count("exited abnormally") for log in logs)
    poison = sum(log.count("poison signal") for log in logs)
    if crashes or poison:
        failures.append(f"in the logs: {crashes} actor crashes, {poison} poison signals")
    print(f"seed {seed}: {args.rounds} rounds, {node.starts} starts, {len(accepted)} accepted, "
          f"{len(decided)} decided, {len(receipts)} receipts", flush=True)
    for f in failures:
        print("FAILED:", f, flush=True)
    return 1 if failures else 0


try:
    rc = main()
finally:
    if node.proc and node.proc.poll() is None:
        node.kill()
    if args.amqp:
        cleanup_broker()
if rc == 0 and not args.keep:
    shutil.rmtree(work, ignore_errors=True)
elif rc != 0:
    print(f"kept {work} for a look", flush=True)
sys.exit(rc)
