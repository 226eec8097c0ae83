#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the main VTL demo: the Hooker
# carries an unmodified TCP transfer (curl from python3 -m http.server) between
# two testbed hosts over a lossy link, next to the same transfer over plain TCP.
# Arguments go to `vtl demo`.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

bash scripts/setup.sh
exec .venv/bin/vtl demo "$@"
