#!/usr/bin/env bash
# Install what the tests need, then run the whole suite against each real ComfyUI test host in turn (CPU only):
# ComfyUI 0.3.75 and ComfyUI 0.33.0 (current master), each in its own environment (see scripts/install.sh).
# With COMFYUI_PATH set, the suite runs once, against that checkout, in the current Python.
# Arguments go to pytest. Each host's JUnit report, screenshots and logs land in test_artifacts/<host>/.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
. scripts/hosts.sh

if [ -n "${COMFYUI_PATH:-}" ]; then
  exec "${PYTHON:-python3}" -m pytest "$@"
fi

status=0; summary=()
for host in $TRAINFREE_HOSTS; do
  artifacts="$(pwd)/test_artifacts/$host"
  mkdir -p "$artifacts"
  echo "=== ComfyUI $host ==="
  start=$(date +%s)
  COMFYUI_PATH="$(host_comfyui "$host")" TRAINFREE_ARTIFACTS="$artifacts" \
    "$(host_python "$host")" -m pytest --junitxml="$artifacts/junit.xml" -o junit_suite_name="comfyui-$host" "$@"
  rc=$?
  [ $rc -eq 0 ] || status=$rc
  summary+=("$host: $("$(host_python "$host")" -m harness.junit_summary "$artifacts/junit.xml") in $(( $(date +%s) - start )) s")
done
echo "=== feature probes per host ==="
"${PYTHON:-python3}" -m harness.probe_record test_artifacts/*/probes.json || status=1
echo "=== summary per host ==="
printf '%s\n' "${summary[@]}"
"${PYTHON:-python3}" -m harness.junit_summary --total test_artifacts/*/junit.xml
exit $status
