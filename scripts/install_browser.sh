#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests marked `browser`): Debian's `chromium`
# package, which Playwright drives through executable_path.  Browser downloads
# (`playwright install`) do not work here, so never run them.  Idempotent: does nothing when
# /usr/bin/chromium is already there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
echo "install_browser: $(/usr/bin/chromium --version) installed"
