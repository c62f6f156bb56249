#!/usr/bin/env bash
# The report test (tests/test_report_browser.py) loads results/index.html in a headless
# Debian chromium. Install it when running as root with apt; otherwise say how (the test then
# skips, naming this script).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing the Debian package chromium (headless browser for the report test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "The report test needs chromium; install it, for example:" >&2
  echo "  sudo apt-get install -y --no-install-recommends chromium" >&2
fi
