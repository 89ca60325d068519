#!/bin/sh
# Install or update battery-aggregator on a GX device (Venus OS v3.60 or later), from the unpacked release:
#
#   ./setup/install.sh [options]
#
# Needs no pip and no network: the release's wheels/ holds the dependencies for each CPU and Python.
# Safe to run again; a failed run never removes a working install, the config or the learned state.
#   - copies the app (aggregator/, setup/, wheels/, config_generator/, docs/, check_config.sh) to
#     /data/battery-aggregator
#   - writes the daemontools service (service/run, service/log/run) and the command bin/battery-aggregator
#   - adds one line to /data/rc.local: at every boot it checks that the dependencies import with the firmware's
#     Python (repairing them from wheels/ after a firmware update) and only then links /service/battery-aggregator
#   - creates /data/setupOptions/BatteryAggregator/config.json with defaults if there is none; the learned state
#     lives in its state/ subdirectory (stateDir), outside the app: uninstall keeps both
#   - puts bin/ on root's PATH (/data/home/root/.profile), so `battery-aggregator status` works in a new shell
# It refuses to run beside pulquero's BatteryAggregator (both would claim com.victronenergy.battery.aggregator):
# --replace-batteryaggregator stops and removes that one first, keeping its config.json, which is read as is.
#
# Options:
#   --replace-batteryaggregator  remove pulquero's BatteryAggregator first (its config is kept)
#   --background   copy the files now, check and link the service in the background (SetupHelper's setup)
#   --no-start     do not start or stop the service (svc); the link is still made when the dependencies import
#   --wheels DIR   the wheel bundle (default: the release's wheels/)
#   --config PATH  config file (default /data/setupOptions/BatteryAggregator/config.json)
#   --root DIR     treat DIR as / (every absolute path is taken relative to DIR; env ROOT does the same)
#   -h, --help     this text
# Environment: PYTHON (default python3 on the PATH).
#
# Exit status: 0 installed and checked (or checking in the background); 2 usage; 3 Python too old (Venus OS
# before v3.60); 4 installed but not running: its dependencies do not import (STATUS in the app directory says
# why); 5 pulquero's BatteryAggregator is installed; 1 other errors.
set -u

NAME=battery-aggregator
ROOT=${ROOT:-}
NO_START=0
BACKGROUND=0
REPLACE=0
WHEELS=
CONFIG=/data/setupOptions/BatteryAggregator/config.json

# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die 2 "--root needs a directory"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#--root=} ;;
        --no-start) NO_START=1 ;;
        --background) BACKGROUND=1 ;;
        --replace-batteryaggregator) REPLACE=1 ;;
        --wheels) [ $# -ge 2 ] || die 2 "--wheels needs a directory"; WHEELS=$2; shift ;;
        --wheels=*) WHEELS=${1#--wheels=} ;;
        --config) [ $# -ge 2 ] || die 2 "--config needs a path"; CONFIG=$2; shift ;;
        --config=*) CONFIG=${1#--config=} ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die 2 "unknown option: $1" ;;
    esac
    shift
done

ROOT=${ROOT%/}
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT" || die 1 "cannot create $ROOT"
    ROOT=$(cd "$ROOT" && pwd)
fi
RELEASE=$(cd "$(dirname "$0")/.." && pwd)       # the unpacked release (setup/ is inside it)
set_paths "$ROOT" "$ROOT$CONFIG"
[ -n "$WHEELS" ] || WHEELS=$RELEASE/wheels
VERSION=$(cat "$RELEASE/VERSION" 2>/dev/null || sed -n 's/^__version__ = "\(.*\)"/\1/p' "$RELEASE/aggregator/__init__.py")

# 1. Python >= 3.11 (Venus OS before v3.60 has 3.8).
PYTHON=${PYTHON:-python3}
have "$PYTHON" || die 3 "python3 not found. battery-aggregator needs Python >= 3.11 (Venus OS v3.60 or later)."
PYTHON=$(command -v "$PYTHON")
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1 |
    sed -n 's/^[^0-9]*\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
case "$PYVER" in
    [0-9]*.[0-9]*) ;;
    *) die 3 "cannot run $PYTHON to read its version. battery-aggregator needs Python >= 3.11." ;;
esac
PYMAJOR=${PYVER%%.*}
PYMINOR=${PYVER#*.}
if [ "$PYMAJOR" -lt 3 ] || { [ "$PYMAJOR" -eq 3 ] && [ "$PYMINOR" -lt 11 ]; }; then
    die 3 "Python $PYVER is too old: battery-aggregator needs Python >= 3.11. Venus OS up to v3.5x ships Python 3.8; update the GX firmware to Venus OS v3.60 or later (Python 3.12), then run this again. Nothing was installed."
fi
say "Python $PYVER ($PYTHON): OK"
[ -d "$RELEASE/aggregator" ] || die 1 "no aggregator/ package next to setup/ in $RELEASE: run this from the unpacked release"

# 2. Never two aggregators on one bus name.
OLD=$(old_aggregator)
if [ -n "$OLD" ]; then
    if [ "$REPLACE" = 0 ]; then
        die 5 "pulquero's BatteryAggregator is installed ($OLD). Both would claim com.victronenergy.battery.aggregator. To replace it, run:
    $RELEASE/setup/install.sh --replace-batteryaggregator
It stops and removes BatteryAggregator (PackageManager will not reinstall it) and keeps its config, which
battery-aggregator reads unchanged: $CONFIG. Nothing was installed."
    fi
    replace_old_aggregator || die 1 "could not remove pulquero's BatteryAggregator (see above); nothing else was changed"
fi
remove_our_old_package

# 3. Stop a running service while its files are replaced (started again once the check passes, and also
#    if this install fails on the way: a failed update leaves the running version running).
SVC_STOPPED=0
if [ "$NO_START" = 0 ] && [ -e "$LINK" ] && have svc; then
    svc -d "$LINK" 2>/dev/null && SVC_STOPPED=1
fi
restart_if_failed() {
    status=$?
    if [ "$status" != 0 ] && [ "$SVC_STOPPED" = 1 ] && [ -L "$LINK" ]; then
        svc -u "$LINK" 2>/dev/null && warn "this install failed; the service runs on as it was"
    fi
}
trap restart_if_failed EXIT

# 4. The app: each part is copied next to the old one and swapped in, so a failure leaves the old install whole.
mkdir -p "$APP" || die 1 "cannot create $APP"
copy_in() {  # copy_in SRC NAME: replace $APP/NAME by a copy of SRC
    [ -e "$1" ] || return 0
    rm -rf "$APP/$2.new"
    cp -R "$1" "$APP/$2.new" || { rm -rf "$APP/$2.new"; die 1 "cannot copy $2 to $APP (the previous install is unchanged)"; }
    rm -rf "$APP/$2.old"
    if [ -e "$APP/$2" ]; then mv "$APP/$2" "$APP/$2.old" || die 1 "cannot replace $APP/$2"; fi
    mv "$APP/$2.new" "$APP/$2" || die 1 "cannot replace $APP/$2"
    rm -rf "$APP/$2.old"
}
if [ "$RELEASE" != "$APP" ]; then
    migrate_state_from_app_dir
    copy_in "$RELEASE/aggregator" aggregator
    rm -rf "$APP/aggregator/tests"
    find "$APP/aggregator" -name __pycache__ -type d | while read -r d; do rm -rf "$d"; done
    copy_in "$RELEASE/setup" setup
    copy_in "$RELEASE/config_generator" config_generator
    copy_in "$RELEASE/check_config.sh" check_config.sh
    copy_in "$RELEASE/README.md" README.md
    copy_in "$RELEASE/CHANGELOG.md" CHANGELOG.md
    copy_in "$RELEASE/docs" docs
    # dependencies installed by pip into lib/ by earlier releases: now one directory per CPU and Python
    if [ -d "$APP/lib" ] && [ ! -e "$APP/lib/current" ] && ! ls -d "$APP"/lib/cp[0-9]*-* >/dev/null 2>&1; then
        rm -rf "$APP/lib"
    fi
    if [ "$WHEELS" != "$APP/wheels" ]; then
        if [ -d "$WHEELS" ]; then copy_in "$WHEELS" wheels; else rm -rf "$APP/wheels"; fi
    fi
fi
printf '%s\n' "$VERSION" > "$APP/VERSION"
say "app $VERSION installed in $APP"

# 5. What the boot check and the commands need to know, the command, and the daemontools service.
cat > "$APP/install.env" <<EOF
# written by setup/install.sh; read by setup/boot.sh and setup/uninstall.sh
ROOT='$ROOT'
PYTHON='$PYTHON'
CONFIG='$CONFIG'
NO_START=$NO_START
EOF
mkdir -p "$APP/bin" "$SVCDIR/log" || die 1 "cannot create $APP/bin and $SVCDIR"
cat > "$APP/bin/$NAME.new" <<EOF
#!/bin/sh
# battery-aggregator with the Python and the dependencies chosen at install and checked at boot
# (written by setup/install.sh). Commands: run, status, check, energy, ... (--help lists them).
if [ ! -f $APP/lib/current/$OK_MARK ]; then
    echo "battery-aggregator: its dependencies are not ready for this Python:" >&2
    cat $STATUS >&2 2>/dev/null
    exit 4
fi
export PYTHONPATH=$APP:$APP/lib/current\${PYTHONPATH:+:\$PYTHONPATH}
exec $PYTHON -m aggregator "\$@"
EOF
cat > "$SVCDIR/run.new" <<EOF
#!/bin/sh
# battery-aggregator service (written by setup/install.sh)
[ -f $PROFILE_D ] && . $PROFILE_D
exec 2>&1
if [ ! -f $APP/lib/current/$OK_MARK ]; then
    # the boot check has not passed for this Python: say so once a minute, never a restart loop
    echo "not started: the dependencies are not ready, see $STATUS"
    sleep 60
    exit 1
fi
export PYTHONUNBUFFERED=1
exec $APP/bin/$NAME run --config $CONFIG
EOF
cat > "$SVCDIR/log/run.new" <<EOF
#!/bin/sh
exec 2>&1
exec multilog t s25000 n4 $LOGDIR
EOF
chmod 755 "$APP/bin/$NAME.new" "$SVCDIR/run.new" "$SVCDIR/log/run.new"
mv "$APP/bin/$NAME.new" "$APP/bin/$NAME" && mv "$SVCDIR/run.new" "$SVCDIR/run" &&
    mv "$SVCDIR/log/run.new" "$SVCDIR/log/run" || die 1 "cannot write the run scripts"
mkdir -p "$LOGDIR" 2>/dev/null || true

# 6. The boot check from /data/rc.local (/service is rebuilt in RAM at boot, and a firmware update may bring
#    another Python). It runs in the background so the boot does not wait for it.
mkdir -p "$ROOT/data" || die 1 "cannot create $ROOT/data"
if [ ! -f "$RCLOCAL" ] && [ -f "$RCLOCAL.disabled" ]; then
    # The user switched off third-party boot hooks (Settings, General, Modification checks): respect that, and
    # have the line there for when they are switched on again.
    RCLOCAL=$RCLOCAL.disabled
    warn "boot hooks are disabled ($RCLOCAL): after a reboot battery-aggregator does not start until they are enabled again (Settings > General > Modification checks)"
fi
[ -f "$RCLOCAL" ] || printf '#!/bin/sh\n' > "$RCLOCAL" || die 1 "cannot create $RCLOCAL"
BOOT_LINE="if [ -x $APP/setup/boot.sh ]; then $APP/setup/boot.sh --background; fi  $MARKER"
# Drop our old line (whatever its paths), then add it once: before a final "exit" if the file has one.
awk -v marker="$MARKER" -v line="$BOOT_LINE" '
    index($0, marker) { next }
    { lines[++n] = $0 }
    END {
        at = n + 1
        for (i = n; i >= 1; i--) {
            if (lines[i] ~ /^[ \t]*$/) continue
            if (lines[i] ~ /^[ \t]*exit([ \t]|$)/) at = i
            break
        }
        for (i = 1; i <= n; i++) { if (i == at) print line; print lines[i] }
        if (at == n + 1) print line
    }' "$RCLOCAL" > "$RCLOCAL.new" && cat "$RCLOCAL.new" > "$RCLOCAL" && rm -f "$RCLOCAL.new" \
    || die 1 "cannot update $RCLOCAL"
chmod 755 "$RCLOCAL"
say "boot check added to $RCLOCAL"

# 7. The command on root's PATH (the home directory is on /data, so it survives firmware updates).
mkdir -p "$(dirname "$USER_PROFILE")" 2>/dev/null &&
    { grep -v -F "$MARKER" "$USER_PROFILE" 2>/dev/null; echo "PATH=\$PATH:$APP/bin  $MARKER"; } > "$USER_PROFILE.new" &&
    mv "$USER_PROFILE.new" "$USER_PROFILE" || warn "cannot add $APP/bin to the PATH in $USER_PROFILE"

# 8. The config: created with defaults once, never overwritten; the learned state next to it.
mkdir -p "$(dirname "$CONFIG")" || die 1 "cannot create $(dirname "$CONFIG")"
if [ -e "$CONFIG" ]; then
    say "config kept: $CONFIG"
elif [ -f "$RELEASE/setup/config.default.json" ]; then
    cp "$RELEASE/setup/config.default.json" "$CONFIG" && say "default config written: $CONFIG"
else
    printf '{}\n' > "$CONFIG" && say "default config written: $CONFIG"
fi

# 9. Check the dependencies (installing them from the bundle where needed), then link and start the service.
if [ "$BACKGROUND" = 1 ]; then
    "$APP/setup/boot.sh" --background
    say "the dependencies are checked in the background; the service starts when they import ($STATUS says)"
    exit 0
fi
"$APP/setup/boot.sh"
status=$?
if [ "$status" != 0 ]; then
    say "installed, but NOT running: $(cat "$STATUS" 2>/dev/null)"
    exit 4
fi
say "the command: $APP/bin/$NAME (on the PATH in new shells): $NAME status | check | energy ..."
say "check the config: $APP/check_config.sh; logs: tail -F $LOGDIR/current | tai64nlocal"
exit 0
