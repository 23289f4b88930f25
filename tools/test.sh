#!/usr/bin/env bash
# Set everything up, then run the whole test suite twice: with the Cython range map (required), and
# again with the pure-Python twin forced (QCOW2_NO_EXTENSIONS=1).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
echo "== test suite, Cython range map ==" >&2
QCOW2_REQUIRE_EXTENSIONS=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "== test suite, pure-Python range map (QCOW2_NO_EXTENSIONS=1) ==" >&2
QCOW2_NO_EXTENSIONS=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
