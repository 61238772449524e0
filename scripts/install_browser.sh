#!/bin/sh
# Install Debian's chromium and chromium-driver (the ERF explorer's browser test drives them
# headless with selenium) with apt, as root or through sudo. Exits non-zero, changing nothing,
# where neither is possible.
set -e
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install chromium and chromedriver yourself" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n";
else
    echo "need root for 'apt-get install chromium chromium-driver'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y chromium chromium-driver >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && $SUDO apt-get install -y chromium chromium-driver >/dev/null
}
echo "installed chromium and chromium-driver"
