#!/usr/bin/env bash
# Run the version-sensitive tests against other releases of torch (and transformers), each set in its
# own virtual environment.
#
#   bash benchmarks/check_torch_versions.sh 2.15.0 2.11.0             # torch releases
#   bash benchmarks/check_torch_versions.sh 2.14.1+transformers==4.57.1 # torch + another requirement
#
# The tests that touch library internals most (checkpoint conversion through torch.distributed.checkpoint
# and transformers, Megatron's dist_checkpointing, async save, the CPU redirections of cuda calls) run
# against each set (the project with pytest, not the test extra: datatrove 0.10 pins transformers 5).
# Environments live in $KUMIHIMO_COMPAT_DIR (default /tmp/kumihimo-compat) and are reused
# on a re-run. pip's machine-wide constraint file (if any) is ignored for these environments only, so a
# release it caps can be tested. Prints one line per set and exits 1 if any failed; README.md lists the
# results.
set -uo pipefail
cd "$(dirname "$0")/.."
sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(2.15.0)
root="${KUMIHIMO_COMPAT_DIR:-/tmp/kumihimo-compat}"
tests=(tests/test_convert_from_hf.py tests/test_convert_to_hf.py tests/test_pretrain_async_save.py
       tests/test_pretrain_loss.py tests/test_cli.py tests/test_configs.py)
status=0
summary=()
for set in "${sets[@]}"; do
  IFS=+ read -r version extra <<<"$set"
  name="torch-$version${extra:+-${extra//[=<>]/}}"
  venv="$root/$name"
  log="$root/$name.log"
  mkdir -p "$root"
  if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
  # shellcheck disable=SC2086
  if ! PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "torch==$version" $extra -e . "pytest>=8" "pytest-timeout>=2.3" >"$log" 2>&1; then
    summary+=("$set: install failed (see $log)"); status=1; continue
  fi
  got=$("$venv/bin/python" -c "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in ('torch', 'megatron-core', 'transformers')))")
  start=$(date +%s)
  if "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" >>"$log" 2>&1; then
    result="passed"
  else
    result="FAILED"; status=1
  fi
  summary+=("$got: $result: $(tail -1 "$log") in $(( $(date +%s) - start )) s; log $log")
done
printf '%s\n' "${summary[@]}"
exit $status
