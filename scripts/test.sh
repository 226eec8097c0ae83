#!/usr/bin/env bash
# Install everything (scripts/setup.sh), lint, and run the whole test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k netns -x
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

cleanup_netns() {
    # Remove leftover VTL test namespaces (vtlt-*) whose creating process is
    # gone; namespaces of other test runs still in progress are left alone.
    # The testbed module uses only the standard library, so this works even
    # if the virtualenv could not be built.
    local py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" \
        "$py" -m vtl.testbed cleanup >&2 || true
}
trap cleanup_netns EXIT

bash scripts/setup.sh

echo "[test] ruff check src tests" >&2
ruff_rc=0
.venv/bin/ruff check src tests || ruff_rc=$?

# Run the tests even when lint fails, so one CI log shows both.
echo "[test] pytest -q -ra $*" >&2
rc=0
.venv/bin/python -m pytest -q -ra "$@" || rc=$?
case "$rc" in
    0) ;;
    5) echo "[test] FAILED: pytest collected no tests" >&2 ;;
    *) echo "[test] FAILED: pytest exited with status $rc" >&2 ;;
esac
if [ "$ruff_rc" -ne 0 ]; then
    echo "[test] FAILED: ruff check found problems (exit $ruff_rc)" >&2
    [ "$rc" -ne 0 ] || rc=$ruff_rc
fi
exit "$rc"
