#!/usr/bin/env bash
# Run the end-to-end Legato demo (starts the local Kafka broker if needed).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
exec .venv/bin/legato demo "$@"
