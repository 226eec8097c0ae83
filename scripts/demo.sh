#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the main VTL demo: a file
# transfer between two network namespaces. Arguments go to `vtl demo`.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

bash scripts/setup.sh
exec .venv/bin/vtl demo "$@"
