#!/usr/bin/env bash
# Unpacks the engine core's C++ build dependencies into .device-deps/ so that a machine
# with a compiler, CMake and nvcc but none of these libraries (the GPU device machine,
# which has no package manager or network) can build and run the CUDA tests.
#
# Run it HERE, on the Debian development machine (it uses apt-get download, no install),
# then carry .device-deps with the device call; scripts/device-check.sh picks it up.
#
#   scripts/prepare-device-deps.sh            # writes ./.device-deps
#   scripts/prepare-device-deps.sh /tmp/deps  # elsewhere
#
# What goes in (Debian's own builds, the same versions CI compiles against):
#   abseil (headers, CMake config, shared libs), GoogleTest + GoogleMock (static libs and
#   CMake config; the GTest config refers to gmock's files too), nlohmann-json (headers),
#   SentencePiece (headers, .pc, shared libs; only the tokenizer links it, but the root
#   CMakeLists requires it at configure time) and pkgconf (find_package(PkgConfig) needs
#   an executable).
# Binaries from an older Debian run on newer glibc/libstdc++, not the other way round, so
# prepare this on a system no newer than the device image.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="$(realpath -m "${1:-.device-deps}")"

# -dev packages; their versioned runtime libraries are found from their dependencies.
DEV_PKGS=(libabsl-dev libgtest-dev libgmock-dev nlohmann-json3-dev libsentencepiece-dev pkgconf-bin)
RUNTIME_RE='^(libabsl[0-9]+|libsentencepiece[0-9]+|libpkgconf[0-9]+)$'

if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
  echo "prepare-device-deps: needs apt-get and dpkg (run it on the Debian dev machine)" >&2
  exit 1
fi

runtime_pkgs() {
  apt-cache depends --no-recommends --no-suggests "${DEV_PKGS[@]}" 2>/dev/null |
    awk '/^ *Depends:/ { gsub(/[<>]/, "", $2); print $2 }' | sed 's/:.*//' |
    grep -E "$RUNTIME_RE" | sort -u
}

mapfile -t RUNTIME_PKGS < <(runtime_pkgs || true)
if [[ ${#RUNTIME_PKGS[@]} -eq 0 ]]; then
  echo "prepare-device-deps: package lists look empty; running apt-get update" >&2
  apt-get update -qq
  mapfile -t RUNTIME_PKGS < <(runtime_pkgs)
fi
PKGS=("${DEV_PKGS[@]}" "${RUNTIME_PKGS[@]}")

WORK="$(mktemp -d)"
chmod 755 "$WORK"  # apt-get download drops privileges to _apt when it can
trap 'rm -rf "$WORK"' EXIT
echo "prepare-device-deps: downloading ${PKGS[*]}"
if ! (cd "$WORK" && apt-get download -q "${PKGS[@]}" >/dev/null); then
  apt-get update -qq
  (cd "$WORK" && apt-get download -q "${PKGS[@]}" >/dev/null)
fi

rm -rf "$DEST"
mkdir -p "$DEST"
for deb in "$WORK"/*.deb; do
  dpkg -x "$deb" "$DEST"
done
rm -rf "$DEST/usr/share/doc" "$DEST/usr/share/man" "$DEST/usr/share/lintian" "$DEST/usr/src"
# abseil's CMake config imports the shared libraries; its static archives only take room
# in the 64 MiB a device call may carry.
rm -f "$DEST"/usr/lib/x86_64-linux-gnu/libabsl_*.a

# .pc files name /usr; make them relative to their own folder (pkgconf's ${pcfiledir}) so
# the tree works wherever it is unpacked.
while IFS= read -r -d '' pc; do
  rel="$(realpath --relative-to="$(dirname "$pc")" "$DEST/usr")"
  sed -E -i "s#(^prefix=|-I|-L|^[a-z_]+=)/usr(/|\$)#\\1\${pcfiledir}/${rel}\\2#g" "$pc"
done < <(find "$DEST" -name '*.pc' -print0)

{
  echo "# Written by scripts/prepare-device-deps.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  grep -E '^PRETTY_NAME=' /etc/os-release || true
  for deb in "$WORK"/*.deb; do
    dpkg-deb -f "$deb" Package Version | paste -sd' '
  done
} >"$DEST/MANIFEST"

echo "prepare-device-deps: wrote $DEST ($(du -sh "$DEST" | cut -f1))"
cat "$DEST/MANIFEST"
