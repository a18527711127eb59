#!/usr/bin/env bash
# Build layercache's container image from deploy/Dockerfile, FROM scratch: nothing is
# pulled. The image holds the `dist` build of the binary (debug sections stripped), the
# shared libraries `ldd` says it loads and the dynamic loader (none for a static binary;
# this toolchain has no musl target, so the binary links glibc), the host's CA
# certificates, a user `layercache` (uid and gid 10001) it runs as, and /data, owned by
# that user, as its volume.
#
#   scripts/build-image.sh [--tag NAME:TAG] [--binary PATH] [--source URL]
#
#   --tag      the image's name (default: layercache:VERSION)
#   --binary   package this binary (default: `cargo build --profile dist -p layercache`,
#              then target/dist/layercache)
#   --source   org.opencontainers.image.source (default: the git remote `origin`, else
#              the checkout as a file:// URL)
#
# Labels: org.opencontainers.image.version (the binary's own, i.e. Cargo.toml's),
# .revision (the git commit, `-dirty` with local changes), .source, .created.
# DOCKER names the docker client (default: docker); it sees DOCKER_HOST and
# DOCKER_BUILDKIT as usual. Prints the image's name and id last.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
docker="${DOCKER:-docker}"
tag=""
binary=""
source=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --source) source="$2"; shift 2 ;;
    -h | --help)
      sed -n '2,20p' "$0"
      exit 0
      ;;
    *)
      echo "unknown option $1 (see --help)" >&2
      exit 2
      ;;
  esac
done

if [ -z "$binary" ]; then
  (cd "$root" && cargo build --profile dist --locked -p layercache)
  binary="$root/target/dist/layercache"
fi
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 1; }
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca_bundle" ] || { echo "no CA certificates at $ca_bundle (Debian: ca-certificates)" >&2; exit 1; }

version="$("$binary" --version | awk '{print $2}')"
[ -n "$version" ] || { echo "$binary --version printed no version" >&2; exit 1; }
tag="${tag:-layercache:$version}"
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && ! git -C "$root" diff --quiet HEAD 2>/dev/null; then
  revision="$revision-dirty"
fi
if [ -z "$source" ]; then
  source="$(git -C "$root" remote get-url origin 2>/dev/null || echo "file://$root")"
fi

context="$(mktemp -d -t layercache-image.XXXXXX)"
trap 'rm -rf "$context"' EXIT
rootfs="$context/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$context/data"
chmod 1777 "$rootfs/tmp"

if command -v strip >/dev/null 2>&1; then
  strip --strip-debug -o "$rootfs/usr/local/bin/layercache" "$binary"
else
  cp "$binary" "$rootfs/usr/local/bin/layercache"
fi

# Each library at the path the loader resolved it to (the loader searches those
# directories by default), symlinks followed; then the loader the binary names.
libraries=0
if ldd "$binary" >/dev/null 2>&1; then
  while read -r path; do
    mkdir -p "$rootfs$(dirname "$path")"
    cp -L "$path" "$rootfs$path"
    libraries=$((libraries + 1))
  done < <(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
fi

cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
layercache:x:10001:10001:layercache:/data:/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
layercache:x:10001:
GROUP
cat >"$rootfs/etc/nsswitch.conf" <<'NSS'
passwd: files
group: files
hosts: files dns
NSS
cp "$root/deploy/Dockerfile" "$context/Dockerfile"

echo "building $tag: layercache $version ($revision), $libraries shared libraries, from $source" >&2
"$docker" build --quiet \
  --build-arg "VERSION=$version" \
  --build-arg "REVISION=$revision" \
  --build-arg "SOURCE=$source" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -t "$tag" "$context" >/dev/null
echo "$tag $("$docker" image inspect --format '{{.Id}}' "$tag")"
