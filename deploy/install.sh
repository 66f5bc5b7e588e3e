#!/usr/bin/env bash
# Install edge-agent as a systemd service on Debian 12 / Raspberry Pi OS (bookworm). Run as root:
#
#   deploy/install.sh [--no-start] [CHECKOUT]
#
# CHECKOUT is the edge-agent source tree to install (default: the one holding this
# script). Safe to run again: it upgrades the code and the unit, keeps an existing
# /etc/edge-agent/agent.toml, and restarts the service (not with --no-start).
set -euo pipefail

PREFIX=/opt/edge-agent
VENV=$PREFIX/venv
CONFIG_DIR=/etc/edge-agent
CONFIG=$CONFIG_DIR/agent.toml
UNIT=edge-agent.service
SERVICE_USER=edge-agent
STATE_DIR=/var/lib/edge-agent
DEMO_MODEL=$PREFIX/models/demo
# Debian's interpreter: one on root's PATH (pyenv, /root/...) may be unreadable to the service.
PYTHON=/usr/bin/python3

usage() { sed -n '2,8s/^# \{0,1\}//p' "$0"; }
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }

start=yes
checkout=
while [ $# -gt 0 ]; do
  case $1 in
    --no-start) start=no ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *)
      [ -z "$checkout" ] || die "give one checkout path"
      checkout=$1
      ;;
  esac
  shift
done
[ -n "$checkout" ] || checkout=$(dirname "${BASH_SOURCE[0]}")/..
[ -d "$checkout" ] || die "no such directory: $checkout"
checkout=$(cd "$checkout" && pwd)
if [ ! -f "$checkout/pyproject.toml" ] || [ ! -f "$checkout/systemd/$UNIT" ]; then
  die "$checkout is not an edge-agent checkout (pyproject.toml, systemd/$UNIT)"
fi
[ "$(id -u)" -eq 0 ] || die "run as root"

# Everything installed here is read by the service user: never inherit a tight umask.
umask 022

missing=()
for pkg in python3-venv mosquitto-clients; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "edge-agent needs Python 3.11 or newer (Debian 12 / Raspberry Pi OS bookworm)"

if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  say "creating the system user $SERVICE_USER"
  useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
    --shell /usr/sbin/nologin --comment "edge-agent daemon" "$SERVICE_USER"
fi

say "installing $checkout into $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "$checkout"
ln -sfn "$VENV/bin/edge-agent" /usr/local/bin/edge-agent

# The 2 MB demo model, so that a fresh box can answer a job before a real model arrives.
if [ -d "$checkout/models/demo" ]; then
  install -d "$DEMO_MODEL"
  cp -R "$checkout/models/demo/." "$DEMO_MODEL/"
  chmod -R u=rwX,go=rX "$DEMO_MODEL"
fi

say "installing /etc/systemd/system/$UNIT"
install -m 0644 "$checkout/systemd/$UNIT" "/etc/systemd/system/$UNIT"

install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
if [ -e "$CONFIG" ]; then
  say "keeping $CONFIG"
else
  # The device id must be a topic-safe name: 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit.
  device_id=$(printf '%s' "$(uname -n)" | tr -c 'A-Za-z0-9_.-' '-' | sed 's/^[^A-Za-z0-9]*//' | cut -c1-64)
  [ -n "$device_id" ] || device_id=edge-box
  say "writing $CONFIG (device_id = $device_id): set the broker, then restart the service"
  tmp=$(mktemp "$CONFIG_DIR/.agent.toml.XXXXXX")
  cat >"$tmp" <<EOF
# edge-agent configuration. Every key, its bounds and its meaning: agent/config.py
# in the source (and README.md). Any key can be overridden from the environment,
# e.g. EDGE_AGENT_MQTT__BROKERS='["b.lan:8883"]' overrides [mqtt] brokers.
device_id = "$device_id"
state_dir = "$STATE_DIR"

[model]
# The bundled demo model proves the pipeline; point this at a real model folder.
path = "$DEMO_MODEL"

[mqtt]
# The brokers, tried in order: when one fails the agent moves to the next.
brokers = ["broker.lan:8883"]
# Login over TLS instead of (or besides) a client certificate:
# username = "$device_id"
# password = "..."

# TLS is required. Put the files of \`edge-fleet provision $device_id\` here (or use
# the agent.toml it writes instead of this file). Plain TCP only for a broker on this
# box or in a lab: remove this section and set allow_plaintext = true under [mqtt].
[mqtt.tls]
ca = "$CONFIG_DIR/ca.crt"
cert = "$CONFIG_DIR/$device_id.crt"
key = "$CONFIG_DIR/$device_id.key"
EOF
  chown "root:$SERVICE_USER" "$tmp"
  chmod 0640 "$tmp"
  mv "$tmp" "$CONFIG"
fi

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --quiet "$UNIT"
  if [ "$start" = yes ]; then
    # Without waiting: the unit is "started" only once the model is loaded and the broker reached.
    systemctl restart --no-block "$UNIT"
    say "started; follow it with: journalctl -u $UNIT -f"
  else
    say "enabled, not started (--no-start): systemctl start $UNIT"
  fi
else
  # An image being built, or a container: enabling works offline, starting does not.
  systemctl enable "$UNIT"
  say "systemd is not running here: $UNIT is enabled and starts at the next boot"
fi
say "check the box with: edge-agent doctor --config $CONFIG"
