#!/usr/bin/env bash
# Installs the appliance under /opt/appliance as a systemd service. Run as root from the repository.
set -euo pipefail
PREFIX=/opt/appliance
EXPORT_DIR=${EXPORT_DIR:-/srv/scanner-export}

id appliance >/dev/null 2>&1 || useradd --system --home /var/lib/appliance --shell /usr/sbin/nologin appliance
mkdir -p "$PREFIX" /etc/appliance "$EXPORT_DIR"
rsync -a --delete --exclude .venv --exclude var --exclude .git --exclude engines ./ "$PREFIX"/
make -C "$PREFIX" venv model
[ -f /etc/appliance/appliance.toml ] || install -m 0644 systemd/appliance.toml /etc/appliance/appliance.toml
# Engines are built here, on this box: a TensorRT plan is bound to this GPU and TensorRT version.
make -C "$PREFIX" engine CONFIG=/etc/appliance/appliance.toml
chown appliance:appliance "$EXPORT_DIR"
install -m 0644 systemd/appliance.service /etc/systemd/system/appliance.service
"$PREFIX/.venv/bin/appliance" check-config --config /etc/appliance/appliance.toml
systemctl daemon-reload
systemctl enable --now appliance.service
systemctl --no-pager status appliance.service
