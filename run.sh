#!/usr/bin/env bash
# The project's two commands on a fresh Debian machine:
#   ./run.sh demo   set up (once) and run the demo: a private bus, the simulated bank and the aggregator, live
#   ./run.sh test   set up (once) and run the whole test suite (on TEST_WORKERS=4 pytest-xdist workers)
# Other commands: ./run.sh setup | bench [ARGS] | shell | gx-check (install the release on ARM under qemu: see
# setup/gx_check.py; needs root; the first run builds two Debian roots in ~/.cache, about 15 minutes)
# Set-up installs what is missing: python3 with venv and dbus-daemon/dbus-send/busctl from apt (as root or
# with sudo), and a virtual environment in .venv with the project and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v dbus-daemon >/dev/null || need_apt+=(dbus-daemon)
command -v dbus-send >/dev/null || need_apt+=(dbus-bin)
command -v busctl >/dev/null || need_apt+=(systemd)
command -v chromium >/dev/null && command -v chromedriver >/dev/null || need_apt+=(chromium chromium-driver)
# A real MQTT broker for the dispatcher's and the cooperative's tests; openssl makes their TLS test certificates.
{ command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null || need_apt+=(mosquitto)
command -v mosquitto_passwd >/dev/null || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null || need_apt+=(openssl)

apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing with apt: $*" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup() {
    if [ ${#need_apt[@]} -gt 0 ]; then apt_install "${need_apt[@]}"; fi
    # A venv whose pip install of the project is newer than pyproject.toml is up to date.
    if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt .venv/.installed ]; then
        [ -x .venv/bin/python ] || python3 -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        .venv/bin/python -m pip install -q -e '.[test]'
        touch .venv/.installed
    fi
}

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    demo) setup; exec .venv/bin/python -m aggregator demo "$@" ;;
    test) setup; exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-4}" --dist worksteal "$@" ;;
    bench) setup; exec .venv/bin/python -m aggregator_dev.bench "$@" ;;
    shell) setup; exec bash --rcfile <(echo '. .venv/bin/activate') ;;
    gx-check) setup; exec .venv/bin/python setup/gx_check.py "$@" ;;
    *) echo "usage: ./run.sh demo|test|setup|bench|shell|gx-check" >&2; exit 2 ;;
esac
