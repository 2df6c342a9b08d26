#!/usr/bin/env bash
# Set up everything (venv, Kafka jars) and run the whole test suite; pytest's "no tests ran" is a failure.
# Arguments go to pytest: `bash .ci/test.sh -m cluster` (make test-cluster) runs only the 3-node cluster test, which
# the default run leaves out (pyproject.toml addopts).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$(bash .ci/setup.sh)"
bash deploy/kafka/kafka.sh fetch >&2
bash deploy/tools/build.sh compose >/dev/null   # validators of deploy/ (built once from pinned Go modules)
bash deploy/tools/build.sh promtool >/dev/null
"$venv/bin/ruff" check detector consumers tests bench
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
