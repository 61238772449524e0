#!/bin/sh
# Install Debian packages with apt, as root or through sudo: the test data (dataset-fashion-mnist)
# and the explorer test's browser (chromium, chromium-driver). Exits non-zero, changing
# nothing, where neither is possible.
#   sh scripts/apt_install.sh PACKAGE...
set -e
if [ "$#" -eq 0 ]; then
    echo "usage: apt_install.sh PACKAGE..." >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install $* another way (see README)" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n";
else
    echo "need root for 'apt-get install $*'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y "$@" >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "$@" >/dev/null
}
echo "installed $*"
