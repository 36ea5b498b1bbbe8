#!/usr/bin/env bash
# Install what the tests need, then run the whole suite against each real ComfyUI test host (CPU only):
# ComfyUI 0.3.75 and ComfyUI 0.33.0 (current master), each in its own environment (see scripts/install.sh).
# The hosts run side by side, one torch thread each (TRAINFREE_SEQUENTIAL=1 runs them one after the other);
# each host's output is printed when it has finished, then the feature probes per host and the totals.
# With COMFYUI_PATH set, the suite runs once, against that checkout, in the current Python.
# Arguments go to pytest. Each host's log, JUnit report, screenshots and images land in test_artifacts/<host>/.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
. scripts/hosts.sh

if [ -n "${COMFYUI_PATH:-}" ]; then
  exec "${PYTHON:-python3}" -m pytest "$@"
fi

run_host() {  # run_host VERSION ARGS...: the suite on one host; writes its log, JUnit report and time
  local host=$1; shift
  local artifacts="$(pwd)/test_artifacts/$host" start=$(date +%s)
  rm -rf "$artifacts"; mkdir -p "$artifacts"
  COMFYUI_PATH="$(host_comfyui "$host")" TRAINFREE_ARTIFACTS="$artifacts" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    "$(host_python "$host")" -m pytest --junitxml="$artifacts/junit.xml" -o junit_suite_name="comfyui-$host" "$@" \
    > "$artifacts/pytest.log" 2>&1
  echo $? > "$artifacts/exit_code"
  echo $(( $(date +%s) - start )) > "$artifacts/seconds"
}

start=$(date +%s)
for host in $TRAINFREE_HOSTS; do
  if [ "${TRAINFREE_SEQUENTIAL:-0}" = 1 ]; then run_host "$host" "$@"; else run_host "$host" "$@" & fi
done
wait

status=0; summary=()
for host in $TRAINFREE_HOSTS; do
  artifacts="test_artifacts/$host"
  echo "=== ComfyUI $host ==="
  cat "$artifacts/pytest.log"
  [ "$(cat "$artifacts/exit_code")" = 0 ] || status=1
  summary+=("$host: $("$(host_python "$host")" -m harness.junit_summary "$artifacts/junit.xml") in $(cat "$artifacts/seconds") s")
done
echo "=== feature probes per host ==="
"${PYTHON:-python3}" -m harness.probe_record test_artifacts/*/probes.json || status=1
echo "=== summary per host (both hosts together: $(( $(date +%s) - start )) s) ==="
printf '%s\n' "${summary[@]}"
"${PYTHON:-python3}" -m harness.junit_summary --total test_artifacts/*/junit.xml
exit $status
