#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain: promtool (Debian's
# `prometheus` package) for the /metrics, config and alert-rule checks, and
# systemd-analyze (Debian's `systemd`) for the unit file, strace for the
# test that sled's blob files are synced, and headless
# chromium for the board. The amqp tests start
# RabbitMQ themselves if it is down. Idempotent.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1; then
    echo "==> installing promtool (Debian package prometheus)"
    # Keep the package from starting a Prometheus server (it would take port 9090).
    guard=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ "$guard" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "==> installing systemd-analyze (Debian package systemd)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
if ! command -v strace >/dev/null 2>&1; then
    echo "==> installing strace (the test that blobs are synced watches the node's system calls)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace >/dev/null
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "==> installing chromium (headless, for the board test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
promtool --version | head -1
systemd-analyze --version | head -1
