#!/usr/bin/env bash
# Install what tests/comfy/test_browser.py needs, only what is missing: Debian's chromium, node + npm,
# and npm's playwright-core (no browser download) in ~/.cache/omniforcing-playwright.
# Used by .ci/run; also fine by hand on a Debian machine (root or sudo). Prints the two paths it found:
#   CHROMIUM=<path>
#   PLAYWRIGHT_CORE_DIR=<path>
set -euo pipefail
PW_PREFIX="${OMNIFORCING_PLAYWRIGHT_PREFIX:-$HOME/.cache/omniforcing-playwright}"
PW_VERSION="${PLAYWRIGHT_CORE_VERSION:-1.65.1}"  # checked against Debian bookworm's chromium 156

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo" || { echo "browser_deps: not root and no sudo" >&2; exit 1; }
fi
apt_updated=""
apt_install() {
  command -v apt-get >/dev/null 2>&1 || { echo "browser_deps: no apt-get to install $*" >&2; exit 1; }
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq >&2
    apt_updated=1
  fi
  echo "[browser_deps] apt-get install $*" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2
}

find_chromium() { [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ] && echo "$CHROMIUM" || command -v chromium || command -v chromium-browser || true; }
chromium_bin="$(find_chromium)"
if [ -z "$chromium_bin" ]; then
  apt_install chromium
  chromium_bin="$(find_chromium)"
fi
[ -n "$chromium_bin" ] || { echo "browser_deps: chromium is still missing" >&2; exit 1; }

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi

pw_dir="${PLAYWRIGHT_CORE_DIR:-$PW_PREFIX/node_modules/playwright-core}"
if [ ! -f "$pw_dir/index.mjs" ]; then
  pw_dir="$PW_PREFIX/node_modules/playwright-core"
  echo "[browser_deps] npm i playwright-core@$PW_VERSION into $PW_PREFIX" >&2
  mkdir -p "$PW_PREFIX"
  npm i --silent --no-audit --no-fund --prefix "$PW_PREFIX" "playwright-core@$PW_VERSION" >&2
fi
[ -f "$pw_dir/index.mjs" ] || { echo "browser_deps: playwright-core is still missing at $pw_dir" >&2; exit 1; }

echo "CHROMIUM=$chromium_bin"
echo "PLAYWRIGHT_CORE_DIR=$pw_dir"
