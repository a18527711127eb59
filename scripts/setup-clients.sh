#!/usr/bin/env bash
# Install the real clients the tests drive (Debian packages; chromium renders the
# dashboard; git serves a git build context; zstd and the npm package in
# crates/layercache/tests/actions-cache are the GitHub Actions cache client; systemd
# brings systemd-analyze, which checks deploy/layercache.service; ca-certificates is
# what scripts/build-image.sh puts into the image; util-linux-extra brings fincore, which
# shows what the filesystem backend leaves in the page cache), the services scale-out
# runs on (PostgreSQL from Debian; Garage, an S3-compatible store, from crates.io), and
# start dockerd.
#
#   scripts/setup-clients.sh [--no-garage | --garage-only]
#
#   --no-garage    everything but Garage (scripts/test-all.sh installs it meanwhile)
#   --garage-only  only Garage: `cargo install --locked garage` (about 7 minutes) unless
#                  ~/.cargo/bin/garage or a garage on PATH is there
#
# Safe to run repeatedly: it installs only what is missing and starts dockerd only if
# it is not answering.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"

garage=yes
clients=yes
for arg in "$@"; do
  case "$arg" in
    --no-garage) garage=no ;;
    --garage-only) clients=no ;;
    -h | --help)
      sed -n '2,15p' "$0"
      exit 0
      ;;
    *)
      echo "unknown option $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

# Garage's binary, where the tests look for it: on PATH, else in ~/.cargo/bin.
garage_bin() {
  command -v garage 2>/dev/null || echo "$HOME/.cargo/bin/garage"
}

install_garage() {
  if [ ! -x "$(garage_bin)" ]; then
    echo "installing Garage (cargo install --locked garage)"
    cargo install --locked --quiet garage
  fi
  "$(garage_bin)" --version >/dev/null
}

if [ "$clients" = no ]; then
  install_garage
  echo "Garage ready: $("$(garage_bin)" --version | head -1)"
  exit 0
fi

packages=()
for pkg in docker.io buildah skopeo busybox-static docker-registry chromium zstd openssl apache2-utils argon2 git postgresql systemd ca-certificates util-linux-extra; do
  dpkg -s "$pkg" >/dev/null 2>&1 || packages+=("$pkg")
done
# node and npm may come from elsewhere than Debian; install Debian's only if missing.
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)

if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing ${packages[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "installing: ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# @actions/cache, pinned by its lock file.
actions_cache="$root/crates/layercache/tests/actions-cache"
if [ ! -d "$actions_cache/node_modules" ]; then
  echo "installing @actions/cache (npm ci in $actions_cache)"
  (cd "$actions_cache" && npm ci --silent --no-audit --no-fund)
fi

# BuildKit inside dockerd (20.10) learns which registries /etc/docker/certs.d holds a CA
# for only when dockerd starts. crates/layercache/tests/tls.rs serves HTTPS on this
# machine's first address, port 5443, and puts its CA there: the directory must exist
# before dockerd starts.
tls_ip="$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$' | grep -v '^127\.' | head -1 || true)"
if [ -n "$tls_ip" ] && [ ! -d "/etc/docker/certs.d/$tls_ip:5443" ]; then
  mkdir -p "/etc/docker/certs.d/$tls_ip:5443"
  if /usr/bin/docker info >/dev/null 2>&1; then
    echo "note: restart dockerd for BuildKit to use /etc/docker/certs.d/$tls_ip:5443 (tests/tls.rs)" >&2
  fi
fi

# The docker client from Debian's docker.io: newer clients without buildx refuse
# DOCKER_BUILDKIT=1.
if ! /usr/bin/docker info >/dev/null 2>&1; then
  echo "starting dockerd"
  nohup /usr/sbin/dockerd --iptables=false >/tmp/layercache-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    /usr/bin/docker info >/dev/null 2>&1 && break
    sleep 1
  done
  /usr/bin/docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 /tmp/layercache-dockerd.log; exit 1; }
fi
services="PostgreSQL $("$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/postgres" --version | awk '{print $3}')"
if [ "$garage" = yes ]; then
  install_garage
  services="$services, $("$(garage_bin)" --version | head -1)"
fi

echo "clients ready: $(/usr/bin/docker version --format 'dockerd {{.Server.Version}}'), $(buildah --version), $(skopeo --version), $(chromium --version 2>/dev/null), node $(node --version), @actions/cache $(node -p "require('$actions_cache/node_modules/@actions/cache/package.json').version"), $services"
