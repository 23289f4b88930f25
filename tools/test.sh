#!/usr/bin/env bash
# Set everything up, then run the whole test suite twice: with the Cython range map (required), and
# again with the pure-Python twin forced (QCOW2_NO_EXTENSIONS=1).  The two runs go side by side
# (one per CPU; their logs are printed when both have finished); QCOW2_TEST_SERIAL=1 runs them one
# after the other, in the terminal.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider "$@")
if [ "${QCOW2_TEST_SERIAL:-0}" = 1 ] || [ "$(nproc)" -lt 2 ]; then
  echo "== test suite, Cython range map ==" >&2
  QCOW2_REQUIRE_EXTENSIONS=1 "${pytest[@]}"
  echo "== test suite, pure-Python range map (QCOW2_NO_EXTENSIONS=1) ==" >&2
  QCOW2_NO_EXTENSIONS=1 "${pytest[@]}"
  exit 0
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
echo "== test suite twice, side by side: Cython range map, pure-Python range map ==" >&2
start=$SECONDS
QCOW2_REQUIRE_EXTENSIONS=1 "${pytest[@]}" >"$logs/cython.log" 2>&1 & cython=$!
QCOW2_NO_EXTENSIONS=1 "${pytest[@]}" >"$logs/python.log" 2>&1 & python=$!
status=0
wait "$cython" || status=1
echo "== test suite, Cython range map ==" >&2
cat "$logs/cython.log"
wait "$python" || status=1
echo "== test suite, pure-Python range map (QCOW2_NO_EXTENSIONS=1) ==" >&2
cat "$logs/python.log"
echo "== both runs: $((SECONDS - start)) s, $([ $status = 0 ] && echo passed || echo FAILED) ==" >&2
exit $status
