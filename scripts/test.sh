#!/usr/bin/env bash
# Run the test suite (integration tests start the local Kafka broker on
# 127.0.0.1:19092 unless LEGATO_BOOTSTRAP points elsewhere). Extra args go to pytest.
# With CI set (.ci/run sets CI=1), a test whose tool is missing (Chromium, kcat, the Kafka jars) fails instead of
# skipping; on a developer's machine it skips.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

# System tools some tests use: kcat (an activity worker in another language), Prometheus/promtool and
# Chromium (the console's browser test drives Debian's build through Playwright: no browser download).
missing=()
command -v kcat >/dev/null 2>&1 || missing+=(kcat)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)

if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    fi
    echo "ci: installing ${missing[*]}"
    # They are only needed by some tests; let the suite run (and report) without them.
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"; }; then
        echo "ci: WARNING: could not install ${missing[*]}; tests that need them will fail under CI (CI set), skip otherwise" >&2
    fi
fi


# Two pytest processes each (pytest-xdist, two cores): the unit tests first, then the integration tests, a module
# per process (a module's fixtures stay on one process) and a broker per process (conftest.py: 19092, 19102).
# Arguments, when given, go to one run of pytest instead.
rc=0
run_pytest() {
    local r=0
    # the slowest tests are listed at the end: what to look at when the suite grows past its 20 minutes
    .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n 2 "$@" || r=$?
    if [ "$r" -eq 5 ]; then
        # pytest's "no tests collected" must not pass as green.
        echo "test.sh: no tests were collected" >&2
        r=1
    fi
    if [ "$rc" -eq 0 ]; then rc=$r; fi
}
if [ "$#" -gt 0 ]; then
    run_pytest --dist loadfile "$@"
else
    run_pytest tests --ignore=tests/integration
    run_pytest --dist loadfile tests/integration
fi
exit "$rc"
