#!/bin/sh
# make dicom-tools: the DICOM peers the tests talk to (Orthanc, DCMTK, dicom3tools) and strace (the power-cut
# tests read the daemon's system calls), installed with apt where we run as root and they are missing; elsewhere
# their tests are skipped, each with the line to run.
set -eu

PACKAGES="orthanc dcmtk dicom3tools strace"
HINT="sudo apt-get install $PACKAGES"

present() {
    [ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1 || return 1
    for program in storescu dcmsend echoscu dciodvfy strace; do
        command -v "$program" >/dev/null 2>&1 || return 1
    done
}

present && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "dicom-tools: Orthanc, DCMTK, dicom3tools or strace missing, and not root with apt: their tests will be skipped ($HINT)" >&2
    exit 0
fi

echo "dicom-tools: installing $PACKAGES" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# The orthanc package starts its stock service (DICOM 4242, HTTP 8042) where the host lets it; the tests
# use their own Orthanc on free ports, so a failed start of that service must not fail the install.
status=0
apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null || status=$?

if ! present; then
    echo "dicom-tools: apt-get install $PACKAGES failed (exit $status)" >&2
    exit 1
fi
if [ "$status" != 0 ]; then
    echo "dicom-tools: installed, but apt-get exited $status (the stock Orthanc service may not have started:" \
        "the tests do not use it; 'dpkg --configure -a' retries it)" >&2
fi
