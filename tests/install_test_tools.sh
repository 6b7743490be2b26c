#!/usr/bin/env bash
# Installs the Debian packages some tests run (when their command is not on PATH already): `chromium`
# for tests/test_web.py, `golang-go` for the Ollama template test in tests/test_gguf.py.
# Never fails the build: where it cannot install, those tests skip and say why.
set -u
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 ||
    command -v google-chrome >/dev/null 2>&1 || missing+=(chromium)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_tools: no apt-get on this system; the tests that need ${missing[*]} will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_test_tools: not root and no passwordless sudo; the tests that need ${missing[*]} will skip" >&2
        exit 0
    fi
fi
log=$(mktemp)
echo "install_test_tools: installing Debian's ${missing[*]} with apt-get (log: $log)" >&2
if DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq >"$log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    rm -f "$log"
else
    tail -n 5 "$log" >&2
    echo "install_test_tools: apt-get could not install ${missing[*]}; the tests that need them will skip" >&2
fi
exit 0
