#!/bin/sh
# The boot check of battery-aggregator: run from /data/rc.local at every boot and by install.sh.
#
#   /data/battery-aggregator/setup/boot.sh [--background]
#
# Checks that the dependencies import with the firmware's Python; where they do not (a firmware update brought
# another Python, or the app was updated), installs them from the bundled wheels, offline. Only then is
# /service/battery-aggregator linked (and started). Where no bundled wheel fits, the service stays down, and why
# is written to STATUS in the app directory, to the system log and to /var/log/battery-aggregator/boot.log.
# --background returns at once (the boot does not wait); the output goes to boot.log.
# Exit status: 0 the service is linked; 4 it is not (STATUS says why); 1 not installed.
set -u

APP=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$APP/install.env" ] || { echo "ERROR: no $APP/install.env: run setup/install.sh" >&2; exit 1; }
# shellcheck source=/dev/null
. "$APP/install.env"
# shellcheck source=common.sh
. "$APP/setup/common.sh"
set_paths "$ROOT" "$CONFIG"
WHEELS=$APP/wheels
mkdir -p "$LOGDIR" 2>/dev/null

if [ "${1:-}" = --background ]; then
    "$0" > "$LOGDIR/boot.log" 2>&1 < /dev/null &
    exit 0
fi

# One check at a time (the boot and PackageManager's reinstall may start one each). A lock whose process is
# gone (a power cut), or older than 10 minutes, is stale.
LOCK=$APP/.boot.lock
if ! mkdir "$LOCK" 2>/dev/null; then
    holder=$(cat "$LOCK/pid" 2>/dev/null)
    if [ -z "$(find "$LOCK" -maxdepth 0 -mmin +10 2>/dev/null)" ] &&
        { [ -z "$holder" ] || kill -0 "$holder" 2>/dev/null; }; then
        say "another boot check is running"
        exit 0
    fi
    rm -rf "$LOCK" && mkdir "$LOCK" || exit 1
fi
echo $$ > "$LOCK/pid"
trap 'rm -rf "$LOCK"' EXIT
trap 'exit 1' INT TERM

down() {  # keep the service down and say why where the user looks
    rm -f "$APP/lib/current"
    if [ -L "$LINK" ]; then
        rm -f "$LINK"
        if have svc && [ "$NO_START" = 0 ]; then
            svc -dx "$SVCDIR" 2>/dev/null
            svc -dx "$SVCDIR/log" 2>/dev/null
        fi
    fi
    printf 'NOT RUNNING (checked %s): %s\n' "$(date)" "$*" > "$STATUS"
    printf '%s\n' "battery-aggregator is not running: $*" >&2
    have logger && logger -t battery-aggregator "not running: $*"
    exit 4
}

have "$PYTHON" || [ -x "$PYTHON" ] || down "$PYTHON not found (Venus OS v3.60 or later has Python 3.12)"
TARGET=$("$PYTHON" "$APP/setup/wheels.py" target 2>&1)
case $? in
    0) ;;
    3) down "$TARGET" ;;
    *) down "cannot run $PYTHON: $TARGET" ;;
esac

system_imports() { PYTHONPATH='' "$PYTHON" -c 'import dbus_next, pydantic, jsonschema' >/dev/null 2>&1; }

say "$(date): checking the dependencies for $TARGET"
"$PYTHON" "$APP/setup/wheels.py" check "$APP/lib" "$WHEELS"
checked=$?
if [ "$checked" != 0 ]; then
    installed=$("$PYTHON" "$APP/setup/wheels.py" install "$WHEELS" "$APP/lib" 2>&1)
    result=$?
    say "$installed"
    case $result in
        0) ;;
        5)
            if [ "$checked" = 7 ]; then
                warn "keeping the dependencies that import"
            elif system_imports; then
                mkdir -p "$APP/lib/$TARGET" && echo "$TARGET system" > "$APP/lib/$TARGET/$OK_MARK"
                say "using the dependencies installed in the system's Python"
            else
                down "the release has no dependencies for this GX ($TARGET: its CPU and Python), so the service cannot run. Install a release that has them (setup/release.py --arch ${TARGET#*-} --python-version $("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'))."
            fi ;;
        *)
            if [ "$checked" = 7 ]; then
                warn "the updated dependencies do not import: keeping the ones that do"
            else
                down "the bundled dependencies for $TARGET do not import: $(printf '%s\n' "$installed" | tail -n 1). Reinstall the release."
            fi ;;
    esac
fi

ln -sfn "$TARGET" "$APP/lib/current" || down "cannot link $APP/lib/current"
if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
    down "$LINK exists and is not a link: remove it, then run $0"
fi
mkdir -p "$(dirname "$LINK")" && ln -sfn "$SVCDIR" "$LINK" || down "cannot link $LINK"
printf 'OK (checked %s): the dependencies import with %s (%s); the service is linked at %s\n' \
    "$(date)" "$PYTHON" "$TARGET" "$LINK" > "$STATUS"
say "service linked: $LINK -> $SVCDIR"
if [ "$NO_START" = 0 ] && have svc; then
    svc -u "$LINK" 2>/dev/null || say "svscan starts it within a few seconds"
fi
exit 0
