#!/usr/bin/env bash
# Prepare a development environment: .venv with Legato installed (editable,
# with test extras) and the Kafka broker jars cached for the local broker.
# Idempotent and quiet on repeat runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "setup: $PYTHON not found; install Python >= 3.11 (or set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
        echo "setup: Python >= 3.11 is required, but $PYTHON is $("$PYTHON" -V 2>&1); set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    echo "setup: creating .venv with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv .venv
fi

if ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup: .venv uses $(.venv/bin/python -V 2>&1) but Python >= 3.11 is required; delete .venv and rerun" >&2
    exit 1
fi

.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# The local broker needs the jars; fetch them now (once) so the first test run
# or demo does not stall on a silent ~1 minute Maven download.
.venv/bin/python -c 'from legato.tools.kafka_local import fetch_jars; fetch_jars()'
