#!/usr/bin/env bash
# Installs Debian's `chromium` (for tests/test_web.py) when no Chromium is on PATH.
# Never fails the build: where it cannot install, the web test skips and says why.
set -u
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get on this system; tests/test_web.py will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_chromium: not root and no passwordless sudo; tests/test_web.py will skip" >&2
        exit 0
    fi
fi
log=$(mktemp)
echo "install_chromium: installing Debian's chromium with apt-get (log: $log)" >&2
if DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq >"$log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >>"$log" 2>&1; then
    rm -f "$log"
else
    tail -n 5 "$log" >&2
    echo "install_chromium: apt-get could not install chromium; tests/test_web.py will skip" >&2
fi
exit 0
