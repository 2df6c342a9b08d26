#!/usr/bin/env bash
# Build one of the pinned offline validators that tests/test_deploy.py runs, once, and print its path:
#   bash deploy/tools/build.sh compose    # Docker Compose v2 (`config` validates deploy/docker-compose.yml)
#   bash deploy/tools/build.sh promtool   # Prometheus's promtool (`check config`, `check rules`)
# The versions and every dependency's checksum are pinned by deploy/tools/NAME/go.mod and go.sum; sources come
# through the Go module proxy. The binary is cached in $DETECTOR_TOOLS (default ~/.cache/detector/tools) under
# a name that carries the hash of go.mod and go.sum, so a pin change rebuilds it. The first build takes about
# 4 minutes on 2 cores (downloads included); later calls print the cached path at once.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:-}"
case "$name" in
  compose)
    pkg=github.com/docker/compose/v2/cmd
    version="$(awk '$1 == "require" && $2 == "github.com/docker/compose/v2" {print $3}' "$here/compose/go.mod")"
    ldflags="-s -w -X github.com/docker/compose/v2/internal.Version=$version"
    ;;
  promtool)
    pkg=github.com/prometheus/prometheus/cmd/promtool
    module="$(awk '$1 == "require" && $2 == "github.com/prometheus/prometheus" {print $3}' "$here/promtool/go.mod")"
    # Prometheus 3.x is published as Go module v0.3MM.P: v0.305.0 is 3.5.0.
    version="$(echo "$module" | awk -F. '{printf "3.%d.%s", substr($2, 2) + 0, $3}')"
    ldflags="-s -w -X github.com/prometheus/common/version.Version=$version"
    ;;
  *)
    echo "usage: bash deploy/tools/build.sh compose|promtool" >&2
    exit 2
    ;;
esac
command -v go >/dev/null || { echo "build.sh: go is not on PATH (Go 1.23 or newer is needed to build $name)" >&2; exit 1; }
src="$here/$name"
cache="${DETECTOR_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/detector/tools}"
hash="$(cat "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-12)"
bin="$cache/$name-$hash"
mkdir -p "$cache"
exec 9>"$cache/.lock-$name"
flock 9
if [ ! -x "$bin" ]; then
  echo "build.sh: building $name $version from $src (first time: about 4 minutes)" >&2
  (cd "$src" && GOFLAGS="-mod=readonly -buildvcs=false -trimpath" go build -ldflags "$ldflags" -o "$bin.tmp" "$pkg") >&2
  mv -f "$bin.tmp" "$bin"
fi
echo "$bin"
