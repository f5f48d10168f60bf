#!/usr/bin/env bash
# Run the torch-sensitive tests against other torch releases, each in its own virtual environment.
#
#   bash benchmarks/check_torch_versions.sh 2.15.0 2.11.0     # versions to check (default: the newest allowed)
#
# The tests that touch torch internals most (checkpoint conversion through torch.distributed.checkpoint,
# Megatron's dist_checkpointing, async save, the CPU redirections of cuda calls) run against each release.
# Environments live in $KUMIHIMO_COMPAT_DIR (default /tmp/kumihimo-compat) and are reused on a re-run.
# pip's machine-wide constraint file (if any) is ignored for these environments only, so a release it
# caps can be tested. Prints one line per release and exits 1 if any failed; README.md lists the results.
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(2.15.0)
root="${KUMIHIMO_COMPAT_DIR:-/tmp/kumihimo-compat}"
tests=(tests/test_convert_from_hf.py tests/test_convert_to_hf.py tests/test_pretrain_async_save.py
       tests/test_pretrain_loss.py tests/test_cli.py tests/test_configs.py)
status=0
summary=()
for version in "${versions[@]}"; do
  venv="$root/torch-$version"
  log="$root/torch-$version.log"
  mkdir -p "$root"
  if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
  if ! PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "torch==$version" -e ".[test]" >"$log" 2>&1; then
    summary+=("torch $version: install failed (see $log)"); status=1; continue
  fi
  got=$("$venv/bin/python" -c "import torch, megatron.core as m; print(torch.__version__, m.__version__)")
  start=$(date +%s)
  if "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" >>"$log" 2>&1; then
    result="passed"
  else
    result="FAILED"; status=1
  fi
  summary+=("torch $got (megatron-core): $result: $(tail -1 "$log") in $(( $(date +%s) - start )) s; log $log")
done
printf '%s\n' "${summary[@]}"
exit $status
