#!/usr/bin/env bash
# Idempotent set-up of a fresh machine (Debian 12, root) for VTL:
#   - Debian packages from scripts/apt-packages.txt (only the missing ones),
#   - bpffs mounted at /sys/fs/bpf,
#   - .venv (pyenv CPython >= 3.11) with `pip install -e '.[test]'`,
#   - the Hooker's BPF objects (clang; cached under /var/cache/vtl/bpf).
# Safe to run repeatedly and from any directory.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
REPO="$(pwd)"

export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[setup] $*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# --- Debian packages ---------------------------------------------------------
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
while IFS= read -r line || [ -n "$line" ]; do
    pkg="${line%%#*}"
    pkg="$(echo "$pkg" | tr -d '[:space:]')"
    [ -n "$pkg" ] || continue
    pkg_installed "$pkg" || missing+=("$pkg")
done < scripts/apt-packages.txt

if [ "${#missing[@]}" -gt 0 ]; then
    if ! is_root; then
        log "missing Debian packages (${missing[*]}) and not root: run this script as root"
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- bpffs -------------------------------------------------------------------
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
    if is_root; then
        log "mounting bpffs at /sys/fs/bpf"
        mkdir -p /sys/fs/bpf
        mount -t bpf bpf /sys/fs/bpf
    else
        log "warning: bpffs not mounted at /sys/fs/bpf and not root"
    fi
fi

# --- Python virtualenv -------------------------------------------------------
# A Python that is >= 3.11 and can create a venv with pip (the pyenv one;
# Debian's /usr/bin/python3 has no working ensurepip without python3-venv).
good_python() {
    "$1" -c 'import sys, venv, ensurepip
sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

find_python() {
    local cand
    for cand in "${VTL_PYTHON:-}" python3 python3.11 \
            "$HOME/.pyenv/shims/python3" /root/.pyenv/shims/python3; do
        [ -n "$cand" ] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if good_python "$cand"; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

VENV="$REPO/.venv"
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c \
        'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
    log "existing .venv is broken or too old: recreating it"
    rm -rf "$VENV"
fi

if [ ! -x "$VENV/bin/python" ]; then
    if ! PY="$(find_python)"; then
        log "no Python >= 3.11 with venv/ensurepip found (expected pyenv's python3)"
        exit 1
    fi
    log "creating .venv with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi

# Reinstall only if pyproject.toml, the repo location or the interpreter changed.
stamp="$VENV/.vtl-installed"
want="$( { sha256sum pyproject.toml; echo "$REPO"; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
        || ! "$VENV/bin/python" -c 'import vtl' >/dev/null 2>&1; then
    log "installing vtl (editable) with test extras into .venv"
    rm -f "$stamp"
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi

# --- BPF objects -------------------------------------------------------------
# The Hooker's BPF C programs (src/vtl/hooker/bpf/) are compiled with clang
# now, so a broken toolchain shows here and not at the first hooked flow.
# Objects are cached by source hash under /var/cache/vtl/bpf.
if [ "$(id -u)" -eq 0 ]; then
    "$VENV/bin/python" -m vtl.hooker.build >&2
else
    log "not root: skipping the BPF build (the Hooker needs root anyway)"
fi

log "ready: $("$VENV/bin/python" --version 2>&1), kernel $(uname -r)"
