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
# The service builds again there itself when the host changes (inference.build_on_start).
install -d -o appliance -g appliance /var/lib/appliance
chown -R appliance:appliance /var/lib/appliance/engines
chown appliance:appliance "$EXPORT_DIR"
# TLS: the clinic's CA lives in /root/appliance-ca (root-only; better, move it off the box), the server's
# certificate and key in /etc/appliance/certs, readable by the service only.
if [ ! -f /etc/appliance/certs/server.crt ]; then
    "$PREFIX/.venv/bin/python" -m appliance.api.certs --out /root/appliance-ca
    install -d -m 0750 -o root -g appliance /etc/appliance/certs
    install -m 0644 /root/appliance-ca/server.crt /root/appliance-ca/ca.crt /etc/appliance/certs/
    install -m 0600 -o appliance -g appliance /root/appliance-ca/server.key /etc/appliance/certs/
fi
echo "Terminals: make -C $PREFIX certs CERTS=/root/appliance-ca TERMINAL=name, then"
echo "  sudo -u appliance $PREFIX/.venv/bin/appliance token add name --scope read --config /etc/appliance/appliance.toml"
install -m 0644 systemd/appliance.service /etc/systemd/system/appliance.service
systemctl daemon-reload
if ! "$PREFIX/.venv/bin/appliance" check-config --config /etc/appliance/appliance.toml; then
    echo "Not started: finish what the line above asks (a terminal token first), then: systemctl enable --now appliance"
    exit 0
fi
systemctl enable --now appliance.service
systemctl --no-pager status appliance.service
