#!/usr/bin/env bash
# Run the test suite (integration tests start the local Kafka broker on
# 127.0.0.1:19092 unless LEGATO_BOOTSTRAP points elsewhere). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected" must not pass as green.
    echo "test.sh: no tests were collected" >&2
    exit 1
fi
exit "$rc"
