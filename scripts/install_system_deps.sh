#!/usr/bin/env bash
# open3d needs libusb-1.0 at import time. Install it when running as root; otherwise say how.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing the Debian package libusb-1.0-0 (needed by open3d)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq libusb-1.0-0 >/dev/null
else
  echo "open3d needs libusb-1.0. Install it first, for example:" >&2
  echo "  sudo apt-get install -y libusb-1.0-0" >&2
  exit 1
fi
