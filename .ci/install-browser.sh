#!/usr/bin/env bash
# Install Debian's Chromium for the report's browser test (tests/test_report.py) when it is missing.
# Idempotent; never fails the CI: without a browser that one test is skipped, with the reason.
# Playwright is driven against /usr/bin/chromium: never let it download its own browser.
set -u
CHROMIUM="${CHROMIUM_BIN:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  echo "install-browser: $CHROMIUM present ($("$CHROMIUM" --version 2>/dev/null | head -n1))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; install Chromium at /usr/bin/chromium yourself (the browser test will be skipped)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-browser: not root and no password-less sudo; skipping (the browser test will be skipped)"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; then
  echo "install-browser: installed $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
else
  echo "install-browser: apt-get could not install chromium (offline or no package); the browser test will be skipped"
fi
exit 0
