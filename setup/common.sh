# Shell helpers shared by install.sh, boot.sh and uninstall.sh (sourced; POSIX sh, busybox on Venus OS).
say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "WARNING: $*" >&2; }
die() { code=$1; shift; printf '%s\n' "ERROR: $*" >&2; exit "$code"; }
# The script's own header comment is its help text.
usage() { sed -n '2,/^set -u/p' "$0" | sed -e '/^set -u/d' -e 's/^# \{0,1\}//'; }
have() { command -v "$1" >/dev/null 2>&1; }

# Every path of an install. $1 is the root (empty on the GX: a fake / in tests), $2 the config file (rooted).
set_paths() {
    APP=$1/data/battery-aggregator              # the app: replaced by every install, removed by uninstall
    SVCDIR=$APP/service
    STATUS=$APP/STATUS                          # what the boot check found: running, or why not
    LINK=$1/service/battery-aggregator
    RCLOCAL=$1/data/rc.local
    LOGDIR=$1/var/log/battery-aggregator
    PROFILE_D=$1/etc/profile.d/profile.sh
    USER_PROFILE=$1/data/home/root/.profile     # root's home is on /data on Venus OS
    CONFIG=$2
    CONFDIR=$(dirname "$CONFIG")
    STATE_DEFAULT=$1/data/setupOptions/BatteryAggregator/state   # the config's stateDir default
    MARKER="# battery-aggregator: boot check (setup/install.sh)"
    OK_MARK=.imports-ok
    # pulquero's BatteryAggregator, which this replaces
    OLD_PACKAGE=$1/data/BatteryAggregator
    OLD_OPTIONS=$1/data/setupOptions/BatteryAggregator
    OLD_SERVICES="$1/service/BatteryAggregator $1/opt/victronenergy/service/BatteryAggregator"
    OLD_INSTALLED=$1/etc/venus/installedVersion-BatteryAggregator
}

# What an install puts into $APP; anything else there is the user's (old state) and is never deleted.
APP_ITEMS="aggregator setup wheels lib bin service config_generator docs check_config.sh README.md CHANGELOG.md VERSION install.env STATUS .boot.lock"

app_item() {
    for item in $APP_ITEMS; do
        case "$1" in "$item"|"$item".new|"$item".old) return 0 ;; esac
    done
    return 1
}

# Files in $APP that are not ours (one per line).
foreign_files() {
    [ -d "$APP" ] || return 0
    for path in "$APP"/* "$APP"/.[!.]*; do
        [ -e "$path" ] || [ -L "$path" ] || continue
        name=${path##*/}
        app_item "$name" || printf '%s\n' "$path"
    done
}

# The config's stateDir when the file sets one ("" when it does not or cannot be read).
configured_state_dir() {
    [ -f "$CONFIG" ] || return 0
    "$PYTHON" -c 'import json, sys
try:
    value = json.load(open(sys.argv[1])).get("stateDir", "")
except Exception:
    value = "?"
print(value if isinstance(value, str) else "?")' "$CONFIG" 2>/dev/null
}

# The learned state used to default to the app directory: move it to the new default, once.
migrate_state_from_app_dir() {
    files=$(foreign_files)
    [ -n "$files" ] || return 0
    configured=$(configured_state_dir)
    if [ -n "$configured" ]; then
        say "kept in $APP (not part of the app, and the config sets stateDir to '$configured'):"
        say "$files"
        return 0
    fi
    mkdir -p "$STATE_DEFAULT" || { warn "cannot create $STATE_DEFAULT: the learned state stays in $APP"; return 0; }
    printf '%s\n' "$files" | while read -r path; do
        name=${path##*/}
        if [ -e "$STATE_DEFAULT/$name" ]; then
            warn "kept $path: $STATE_DEFAULT/$name exists already"
        elif mv "$path" "$STATE_DEFAULT/$name"; then
            say "learned state moved: $path -> $STATE_DEFAULT/$name"
        else
            warn "could not move $path to $STATE_DEFAULT"
        fi
    done
}

# Is $OLD_PACKAGE the SetupHelper package of an earlier release of ours (it used the same name)?
old_package_is_ours() { [ -f "$OLD_PACKAGE/release/setup/install.sh" ]; }

# Where pulquero's BatteryAggregator was found (space separated), or nothing.
old_aggregator() {
    found=""
    for path in $OLD_SERVICES; do
        if [ -e "$path" ] || [ -L "$path" ]; then found="$found $path"; fi
    done
    if [ -d "$OLD_PACKAGE" ] && ! old_package_is_ours; then found="$found $OLD_PACKAGE"; fi
    if [ -e "$OLD_INSTALLED" ] && ! old_package_is_ours; then found="$found $OLD_INSTALLED"; fi
    printf '%s' "${found# }"
}

# Stop and remove pulquero's BatteryAggregator; keep its config; keep PackageManager from bringing it back.
replace_old_aggregator() {
    say "replacing pulquero's BatteryAggregator (its config $OLD_OPTIONS/config.json is kept and read as is)"
    if [ -x "$OLD_PACKAGE/setup" ] && ! old_package_is_ours; then
        say "running its uninstall: $OLD_PACKAGE/setup uninstall"
        if have timeout; then
            timeout 300 "$OLD_PACKAGE/setup" uninstall auto </dev/null || warn "its uninstall failed; removing it here"
        else
            "$OLD_PACKAGE/setup" uninstall auto </dev/null || warn "its uninstall failed; removing it here"
        fi
    fi
    for path in $OLD_SERVICES; do
        [ -e "$path" ] || [ -L "$path" ] || continue
        if have svc; then
            svc -dx "$path" 2>/dev/null
            svc -dx "$path/log" 2>/dev/null
        fi
        if ! rm -rf "$path" 2>/dev/null && [ -x "$ROOT/opt/victronenergy/swupdate-scripts/remount-rw.sh" ]; then
            "$ROOT/opt/victronenergy/swupdate-scripts/remount-rw.sh" && rm -rf "$path"
        fi
        if [ -e "$path" ] || [ -L "$path" ]; then
            warn "cannot remove $path: it would start BatteryAggregator again at the next boot"
            return 1
        fi
        say "removed the service $path"
    done
    rm -f "$OLD_INSTALLED"
    mkdir -p "$OLD_OPTIONS" || return 1
    # PackageManager's flags (in the package's setupOptions): never install it again automatically, never add it
    # back from /data, and drop it from the list of active packages at the next boot.
    for flag in DO_NOT_AUTO_INSTALL DO_NOT_AUTO_ADD FORCE_REMOVE; do
        : > "$OLD_OPTIONS/$flag" || return 1
    done
    if [ -d "$OLD_PACKAGE" ]; then
        backup=$OLD_OPTIONS/BatteryAggregator-package.tar.gz
        tar czf "$backup" -C "$(dirname "$OLD_PACKAGE")" "$(basename "$OLD_PACKAGE")" || return 1
        rm -rf "$OLD_PACKAGE" || return 1
        say "removed $OLD_PACKAGE (a copy is in $backup)"
    fi
    if [ -f "$RCLOCAL" ] && grep -q "/data/BatteryAggregator/" "$RCLOCAL"; then
        grep -v "/data/BatteryAggregator/" "$RCLOCAL" > "$RCLOCAL.new" && cat "$RCLOCAL.new" > "$RCLOCAL" &&
            rm -f "$RCLOCAL.new" && say "removed BatteryAggregator's lines from $RCLOCAL"
    fi
    say "BatteryAggregator is removed; PackageManager will not reinstall it"
    return 0
}

# An earlier release of ours was a SetupHelper package named BatteryAggregator: remove it (PackageManager would
# reinstall that old version after a firmware update), unless this install runs from it.
remove_our_old_package() {
    old_package_is_ours || return 0
    case "$RELEASE/" in "$OLD_PACKAGE"/*) return 0 ;; esac
    mkdir -p "$OLD_OPTIONS" && for flag in DO_NOT_AUTO_INSTALL DO_NOT_AUTO_ADD FORCE_REMOVE; do : > "$OLD_OPTIONS/$flag"; done
    rm -rf "$OLD_PACKAGE" && rm -f "$OLD_INSTALLED" && say "removed $OLD_PACKAGE (an earlier release of this package under the old name)"
}
