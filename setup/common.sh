# Shell helpers shared by install.sh and uninstall.sh (sourced; POSIX sh, busybox on Venus OS).
say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "WARNING: $*" >&2; }
die() { code=$1; shift; printf '%s\n' "ERROR: $*" >&2; exit "$code"; }
# The script's own header comment is its help text.
usage() { sed -n '2,/^set -u/p' "$0" | sed -e '/^set -u/d' -e 's/^# \{0,1\}//'; }
have() { command -v "$1" >/dev/null 2>&1; }
