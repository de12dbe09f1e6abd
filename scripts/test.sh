#!/usr/bin/env bash
# The project's one test command (README, .ci/run): format check, clippy with
# warnings as errors, then every test (unit, property and end-to-end against
# real `tai serve` processes).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "==> installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

bash scripts/install-test-tools.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "==> build (the end-to-end tests run the tai binary)"
cargo build --workspace --bins

echo "==> tests"
cargo nextest run --workspace --no-fail-fast "$@"
