#!/bin/sh
# Install Debian's dataset-fashion-mnist (Fashion-MNIST IDX files, MIT) with apt, as root or
# through sudo. Exits non-zero, changing nothing, where neither is possible.
set -e
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: get Fashion-MNIST's four .gz files and set SRDXAI_FASHION_MNIST" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n";
else
    echo "need root for 'apt-get install dataset-fashion-mnist'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && $SUDO apt-get install -y dataset-fashion-mnist >/dev/null
}
echo "installed dataset-fashion-mnist"
