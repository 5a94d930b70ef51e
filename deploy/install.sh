#!/usr/bin/env bash
# Installs edgeagent as a systemd service on 64-bit Raspberry Pi OS (Debian bookworm).
#
#   sudo ./deploy/install.sh              # from a checkout: install, or upgrade in place
#   sudo ./deploy/install.sh --uninstall  # remove; keeps /etc/edgeagent, /var/lib/edgeagent
#
# What it does, upgrades and uninstalling: docs/deploy.md. Run with --help for options.
set -euo pipefail

NAME=edgeagent
GROUPS_WANTED=(video render i2c plugdev gpio)
ASSETS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: sudo $0 [options]

Installs or upgrades edgeagent: system user '$NAME', venv in /opt/edgeagent/venv,
config in /etc/edgeagent (never overwritten), state in /var/lib/edgeagent, Coral udev
rule, and the systemd unit, which it enables and (re)starts.

options:
  --source PATH     what pip installs: a source tree or a wheel (default: $ASSETS)
  --device-id ID    device.id written into a new config (default: the host name)
  --python PY       interpreter that creates the venv (default: python3)
  --pip-args ARGS   extra arguments for pip install (split on spaces)
  --skip-pip        create no venv and install no package (test the rest)
  --root DIR        install below DIR instead of / (testing, image building): no apt,
                    systemctl or udevadm; users go to DIR/etc/passwd via useradd --root
  --dry-run         print what would be done; change nothing
  --uninstall       remove the unit, venv, udev rule and user
  --purge           with --uninstall: also remove /etc/edgeagent and /var/lib/edgeagent
  -h, --help        this text
EOF
}

say() { printf '%s: %s\n' "$NAME-install" "$*"; }
die() {
  printf '%s: error: %s\n' "$NAME-install" "$*" >&2
  exit 1
}

# Runs a command, or prints it under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf 'would run:'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Runs a command that must not touch a --root install's host (systemctl, udevadm, apt).
host_run() {
  if [[ -n $ROOT ]]; then
    printf 'skipped (--root): %s\n' "$*"
  else
    run "$@"
  fi
}

ROOT=""
SOURCE="$ASSETS"
DEVICE_ID=""
PYTHON=python3
PIP_ARGS=""
SKIP_PIP=0
DRY_RUN=0
UNINSTALL=0
PURGE=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --source) SOURCE="${2:?--source needs a path}"; shift 2 ;;
    --device-id) DEVICE_ID="${2:?--device-id needs a value}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --pip-args) PIP_ARGS="${2?--pip-args needs a value}"; shift 2 ;;
    --skip-pip) SKIP_PIP=1; shift ;;
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

if [[ -n $ROOT ]]; then
  [[ -d $ROOT ]] || die "--root $ROOT is not a directory"
  ROOT="$(cd "$ROOT" && pwd)"
fi
[[ $PURGE == 1 && $UNINSTALL == 0 ]] && die "--purge only goes with --uninstall"

OPT_DIR="$ROOT/opt/$NAME"
VENV="$OPT_DIR/venv"
ETC_DIR="$ROOT/etc/$NAME"
CONFIG="$ETC_DIR/config.yaml"
PASSWORD_FILE="$ETC_DIR/mqtt-password"
STATE_DIR="$ROOT/var/lib/$NAME"
UNIT="$ROOT/etc/systemd/system/$NAME.service"
DROPIN_DIR="$ROOT/etc/systemd/system/$NAME.service.d"
GROUPS_DROPIN="$DROPIN_DIR/10-groups.conf"
UDEV_RULE="$ROOT/etc/udev/rules.d/99-edgeagent-coral.rules"
PASSWD="$ROOT/etc/passwd"
GROUP_DB="$ROOT/etc/group"

# --- checks ------------------------------------------------------------------------

check_arch() {
  ARCH="${EDGEAGENT_ARCH:-$(uname -m)}"
  case "$ARCH" in
    aarch64 | x86_64) ;;
    armv7l | armv6l | armhf)
      die "this is a 32-bit ARM system ($ARCH). LiteRT (ai-edge-litert) has no 32-bit ARM wheels, so edgeagent cannot run here: install the 64-bit Raspberry Pi OS (Raspberry Pi 3, 4, 5, Zero 2 W)." ;;
    *) die "unsupported architecture $ARCH: edgeagent runs on aarch64 (and x86_64 for testing)" ;;
  esac
}

check_privileges() {
  if [[ -z $ROOT && $DRY_RUN == 0 && $EUID -ne 0 ]]; then
    die "run as root: sudo $0"
  fi
}

check_os() {
  [[ -n $ROOT ]] && return 0
  local id="" id_like=""
  if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091  # the file is the host's, read at run time
    id="$(. /etc/os-release && printf '%s' "${ID:-}")"
    # shellcheck disable=SC1091
    id_like="$(. /etc/os-release && printf '%s' "${ID_LIKE:-}")"
  fi
  [[ $id == debian || $id == raspbian || $id_like == *debian* ]] ||
    die "this installer needs Raspberry Pi OS or another Debian (apt); found '${id:-unknown}'"
}

check_python() {
  [[ $SKIP_PIP == 1 ]] && return 0
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt install python3)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "edgeagent needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)"
}

is_raspberry_pi() {
  [[ -r /proc/device-tree/model ]] && grep -qa "Raspberry Pi" /proc/device-tree/model
}

# --- steps -------------------------------------------------------------------------

apt_packages() {
  local wanted=(python3-venv) optional=(mosquitto-clients) missing=() pkg
  if is_raspberry_pi && [[ $ARCH == aarch64 ]]; then
    wanted+=(python3-picamera2)
  fi
  if [[ -n $ROOT ]]; then
    host_run apt-get install -y "${wanted[@]}" "${optional[@]}"
    return 0
  fi
  for pkg in "${wanted[@]}" "${optional[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "system packages present: ${wanted[*]} ${optional[*]}"
    return 0
  fi
  say "installing system packages: ${missing[*]}"
  run apt-get update -qq
  for pkg in "${missing[@]}"; do
    # --no-install-recommends: python3-picamera2 would otherwise pull in a desktop stack.
    if ! run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg"; then
      [[ " ${optional[*]} " == *" $pkg "* ]] || die "apt-get could not install $pkg"
      say "optional package $pkg could not be installed; continuing"
    fi
  done
}

user_exists() { [[ -f $PASSWD ]] && grep -q "^$NAME:" "$PASSWD"; }
group_exists() { [[ -f $GROUP_DB ]] && grep -q "^$1:" "$GROUP_DB"; }
id_of() { awk -F: -v n="$2" '$1 == n { print $3 }' "$1"; }

ROOT_ARGS=()
if [[ -n $ROOT ]]; then ROOT_ARGS=(--root "$ROOT"); fi

create_user() {
  if [[ -n $ROOT ]]; then
    for f in passwd group shadow gshadow; do
      [[ -f $ROOT/etc/$f ]] || die "--root needs $ROOT/etc/$f (useradd --root edits it)"
    done
  fi
  if user_exists; then
    say "user $NAME exists"
  else
    say "creating system user $NAME"
    run useradd "${ROOT_ARGS[@]}" --system --user-group --no-create-home \
      --home-dir "/var/lib/$NAME" --shell /usr/sbin/nologin \
      --comment "edgeagent inference service" "$NAME"
  fi
  PRESENT_GROUPS=()
  MISSING_GROUPS=()
  local g
  for g in "${GROUPS_WANTED[@]}"; do
    if group_exists "$g"; then PRESENT_GROUPS+=("$g"); else MISSING_GROUPS+=("$g"); fi
  done
  if [[ ${#PRESENT_GROUPS[@]} -gt 0 ]]; then
    local joined
    joined="$(IFS=,; printf '%s' "${PRESENT_GROUPS[*]}")"
    say "adding $NAME to groups: $joined"
    run usermod "${ROOT_ARGS[@]}" --append --groups "$joined" "$NAME"
  fi
  if [[ ${#MISSING_GROUPS[@]} -gt 0 ]]; then
    say "this host has no group(s): ${MISSING_GROUPS[*]} (normal off a Raspberry Pi)"
  fi
}

install_venv() {
  if [[ $SKIP_PIP == 1 ]]; then
    say "--skip-pip: no venv, no package install"
    return 0
  fi
  [[ -e $SOURCE ]] || die "--source $SOURCE does not exist"
  if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import sys' 2>/dev/null &&
    grep -q '^include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
    say "upgrading in place: $VENV"
  else
    say "creating $VENV (with the system's site-packages, for python3-picamera2)"
    run rm -rf "$VENV"
    run install -d -m 0755 "$OPT_DIR"
    run "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  local spec="$SOURCE"
  # Extras of a wheel or a source tree: opencv (frames resized at a quarter of Pillow's
  # CPU), picamera2 (its marker limits it to aarch64), i2c.
  spec="${SOURCE}[opencv]"
  if [[ $ARCH == aarch64 ]]; then spec="${SOURCE}[opencv,picamera2,i2c]"; fi
  local extra=()
  if [[ -n $PIP_ARGS ]]; then read -r -a extra <<<"$PIP_ARGS"; fi
  say "pip install $spec"
  run env PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet \
    --upgrade "${extra[@]}" "$spec"
}

install_udev_rule() {
  say "Coral USB udev rule: ${UDEV_RULE#"$ROOT"}"
  run install -D -m 0644 "$ASSETS/deploy/udev/99-edgeagent-coral.rules" "$UDEV_RULE"
  reload_udev
}

reload_udev() {
  if [[ -n $ROOT ]]; then
    host_run udevadm control --reload-rules
  elif command -v udevadm >/dev/null && [[ -S /run/udev/control ]]; then
    run udevadm control --reload-rules
    run udevadm trigger --action=add --subsystem-match=usb
  else
    say "udev is not running here: the rule applies from the next boot"
  fi
}

install_config() {
  local uid gid
  uid="$(id_of "$PASSWD" "$NAME")"
  gid="$(id_of "$GROUP_DB" "$NAME")"
  uid="${uid:-$NAME}"
  gid="${gid:-$NAME}"
  run install -d -m 0750 -o 0 -g "$gid" "$ETC_DIR"
  if [[ -e $CONFIG ]]; then
    say "keeping the existing config ${CONFIG#"$ROOT"}"
  else
    local device="${DEVICE_ID:-$(hostname -s 2>/dev/null || hostname)}"
    [[ $device =~ ^[A-Za-z0-9._-]{1,64}$ ]] ||
      die "device id '$device' is not usable in MQTT topics; pass --device-id"
    say "writing ${CONFIG#"$ROOT"} (device.id: $device); edit it, then: systemctl restart $NAME"
    if [[ $DRY_RUN == 1 ]]; then
      printf 'would write: %s\n' "$CONFIG"
    else
      local tmp
      tmp="$(mktemp)"
      sed "s/^\(  id: \)pi-kitchen-01/\1$device/" "$ASSETS/deploy/edgeagent.yaml" >"$tmp"
      install -m 0640 -o 0 -g "$gid" "$tmp" "$CONFIG"
      rm -f "$tmp"
    fi
  fi
  # LoadCredential= fails the start when its file is missing: an empty one until the
  # operator puts the broker password there.
  if [[ ! -e $PASSWORD_FILE ]]; then
    run install -m 0600 -o 0 -g 0 /dev/null "$PASSWORD_FILE"
  fi
  say "state directory ${STATE_DIR#"$ROOT"}"
  run install -d -m 0750 -o "$uid" -g "$gid" "$STATE_DIR"
}

install_unit() {
  say "systemd unit ${UNIT#"$ROOT"}"
  run install -D -m 0644 "$ASSETS/systemd/$NAME.service" "$UNIT"
  # systemd refuses to start a unit whose SupplementaryGroups= names a missing group:
  # list only the ones this host has.
  if [[ ${#MISSING_GROUPS[@]} -gt 0 ]]; then
    say "drop-in ${GROUPS_DROPIN#"$ROOT"}: SupplementaryGroups=${PRESENT_GROUPS[*]}"
    if [[ $DRY_RUN == 1 ]]; then
      printf 'would write: %s\n' "$GROUPS_DROPIN"
    else
      install -d -m 0755 "$DROPIN_DIR"
      printf '%s\n' \
        "# Written by deploy/install.sh: this host has no group(s) ${MISSING_GROUPS[*]}." \
        "[Service]" \
        "SupplementaryGroups=" \
        "SupplementaryGroups=${PRESENT_GROUPS[*]}" >"$GROUPS_DROPIN"
      chmod 0644 "$GROUPS_DROPIN"
    fi
  elif [[ -e $GROUPS_DROPIN ]]; then
    run rm -f "$GROUPS_DROPIN"
  fi
}

systemd_running() { [[ -z $ROOT && -d /run/systemd/system ]]; }

start_service() {
  if [[ -n $ROOT ]]; then
    host_run systemctl daemon-reload
    host_run systemctl enable "$NAME.service"
    host_run systemctl restart "$NAME.service"
  elif systemd_running; then
    run systemctl daemon-reload
    run systemctl enable "$NAME.service"
    say "(re)starting $NAME; waits until the first result (READY=1)"
    if ! run systemctl restart "$NAME.service"; then
      die "installed, but $NAME did not start: systemctl status $NAME; journalctl -u $NAME -b"
    fi
    say "running: systemctl status $NAME; logs: journalctl -u $NAME -f"
  else
    say "systemd is not running here: start it with systemctl enable --now $NAME on the device"
  fi
}

uninstall() {
  if systemd_running; then
    run systemctl disable --now "$NAME.service" || true
  else
    host_run systemctl disable --now "$NAME.service"
  fi
  say "removing the unit, the venv and the udev rule"
  run rm -f "$UNIT"
  run rm -rf "$DROPIN_DIR"
  if systemd_running; then run systemctl daemon-reload; else host_run systemctl daemon-reload; fi
  run rm -rf "$OPT_DIR"
  run rm -f "$UDEV_RULE"
  reload_udev
  if user_exists; then
    say "removing user $NAME"
    run userdel "${ROOT_ARGS[@]}" "$NAME"
  fi
  # userdel leaves the user's own group where login.defs lacks USERGROUPS_ENAB.
  if group_exists "$NAME"; then
    run groupdel "${ROOT_ARGS[@]}" "$NAME"
  fi
  if [[ $PURGE == 1 ]]; then
    say "--purge: removing ${ETC_DIR#"$ROOT"} and ${STATE_DIR#"$ROOT"}"
    run rm -rf "$ETC_DIR" "$STATE_DIR"
  else
    say "kept ${ETC_DIR#"$ROOT"} (config, password) and ${STATE_DIR#"$ROOT"} (state);" \
      "--uninstall --purge removes them"
  fi
}

main() {
  check_privileges
  if [[ $UNINSTALL == 1 ]]; then
    uninstall
    return 0
  fi
  check_arch
  check_os
  check_python
  apt_packages
  create_user
  install_venv
  install_udev_rule
  install_config
  install_unit
  start_service
  say "done"
}

main
