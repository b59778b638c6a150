#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (one process per host; jax.distributed
# finds the slice by itself). Copies this checkout to the workers first unless NO_SYNC=1.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE [PROJECT] -- --config=configs/finetune.py:stage2_si \
#       --workdir=/mnt/shared/runs/si --config.data.path=/data/mammoth_si_10M.json
#
# Environment: DRY_RUN=1 (same as --dry-run: print the commands, run nothing), REMOTE_DIR
# (checkout path on the workers, default ~/lladav-jax), PYTHON (default: python3 on the workers),
# NO_SYNC=1 (the code is already there), SETUP=1 (pip install -r requirements.txt on every worker).
# The workdir must be a path every worker sees (NFS / Filestore, or a bucket mounted with gcsfuse):
# checkpoints are written by all hosts, metrics and TensorBoard by host 0. Re-running resumes.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  sed -n '2,16p' "$0"; exit 2
fi
TPU_NAME="$1"; ZONE="$2"; shift 2
PROJECT=""
if [[ $# -gt 0 && "$1" != "--" ]]; then PROJECT="$1"; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
TRAIN_ARGS=("$@")

REMOTE_DIR="${REMOTE_DIR:-~/lladav-jax}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {
  if [[ "$DRY_RUN" == "1" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

quoted_args=""
for a in "${TRAIN_ARGS[@]}"; do quoted_args+=" $(printf '%q' "$a")"; done
# TPU: large async collective fusion etc. come from libtpu defaults; add LIBTPU_INIT_ARGS here if needed.
REMOTE_CMD="cd ${REMOTE_DIR} && ${PYTHON} -m lladav_jax.train${quoted_args}"

if [[ "${NO_SYNC:-0}" != "1" ]]; then
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --command "mkdir -p ${REMOTE_DIR}"
  run "${GCLOUD[@]}" scp --recurse "$HERE/lladav_jax" "$HERE/configs" "$HERE/requirements.txt" \
      "$HERE/pyproject.toml" "$TPU_NAME:${REMOTE_DIR}/" "${COMMON[@]}"
fi
if [[ "${SETUP:-0}" == "1" ]]; then
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --command \
      "cd ${REMOTE_DIR} && ${PYTHON} -m pip install -r requirements.txt && ${PYTHON} -m pip install 'jax[tpu]'"
fi
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --command "$REMOTE_CMD"
