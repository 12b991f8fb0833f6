#!/usr/bin/env bash
# The GPU suite: one command on a bare GPU machine (one H200; Python 3.12 with torch and
# Triton; no package registry, nothing outside reachable) that installs the carried
# wheels, then runs, each stage under its own `timeout` within 8 minutes in all:
#   1. install  bench/wheels (made here by `make gpu-wheels`) into a scratch folder on PYTHONPATH
#   2. tests    pytest -m gpu tests/kernels (bf16/fp16 <= 1e-2, fp32 <= 1e-5 relative to float64)
#   3. kernels  bench/kernels.py: NormAttention, with decay, DiagAttention, SimpleRMSNorm; 1K-64K, bf16
#   4. train    bench/train_throughput.py: scale/385m kernels on/off, long context 2K/8K/32K
#   5. report   bench/gpu_report.py: the figures beside their targets, as markdown
# A stage that fails or runs out of time is recorded and the next one still runs.
#
# On the GPU machine, with the working tree and bench/wheels (made here by `make gpu-wheels`)
# copied there: bash bench/gpu_suite.sh. $OUT then holds these 8 files (the remote runner
# returns at most 8):
#   gpu_suite.log  stages.jsonl  kernels_{norm,decay,diag,rms}.json  train_throughput.json  gpu_report.md
# and here, into bench/RESULTS.md:
#   .venv/bin/python bench/gpu_report.py report <the folder $OUT was copied to> --results bench/RESULTS.md
#
# On a CPU (`make gpu-suite-dry-run`): bash bench/gpu_suite.sh --dry-run
#   checks the wheels for Python 3.12 instead of installing them (this machine's Python
#   differs), and runs every stage in its tiny CPU mode, writing the same files.
#
# Environment: OUT (output folder; default bench/gpu_out), PYTHON (default python3, or
# .venv/bin/python in a dry run), GPU_SUITE_LIMIT_S (the overall limit, default 480),
# GPU_SUITE_STAGES (comma list: run only these of tests, kernels_norm, kernels_decay,
# kernels_diag, kernels_rms, train; the install always runs), e.g. to rerun what an
# earlier run left out: run(command="GPU_SUITE_STAGES=train bash bench/gpu_suite.sh", ...).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac

START=$SECONDS
LIMIT=${GPU_SUITE_LIMIT_S:-480}
RESERVE=15  # kept back for the report, whatever the stages before it did
# Stage budgets are for the GPU; the dry run's tiny stages run in Triton's interpreter on
# a shared two-core machine, where the same work takes a few times longer.
SCALE=$(( DRY ? 3 : 1 ))
OUTDIR=${OUT:-$REPO/bench/gpu_out}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_suite.log
STAGES=$OUTDIR/stages.jsonl
# Only this suite's files: the folder may be $OUT, or hold an earlier run's output.
rm -f "$LOG" "$STAGES" "$OUTDIR"/kernels_{norm,decay,diag,rms}.json "$OUTDIR/train_throughput.json" \
  "$OUTDIR/gpu_report.md"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# The checkout's kernels/ under the name the code imports it by, transnormer_kernels (an
# install maps it so, see pyproject.toml; here nothing is installed from the checkout).
mkdir "$SCRATCH/checkout" && ln -s "$REPO/kernels" "$SCRATCH/checkout/transnormer_kernels"

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif (( DRY )) && [[ -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO:$SCRATCH/checkout${PYTHONPATH:+:$PYTHONPATH}

say() { echo "$*" | tee -a "$LOG"; }

# run_stage NAME BUDGET_S [--junit FILE] CMD...: CMD under `timeout`, given the smaller of
# its budget and what the overall limit leaves; output to the log and the console; one
# record (exit code, seconds, budget) appended to stages.jsonl. Never stops the suite.
run_stage() {
  local name=$1 budget=$(( $2 * SCALE )) junit=() rc t0 t
  shift 2
  if [[ "$1" == --junit ]]; then junit=(--junit "$2"); shift 2; fi
  if [[ -n "${GPU_SUITE_STAGES:-}" && "$name" != install && ",$GPU_SUITE_STAGES," != *",$name,"* ]]; then
    say "== $name: not selected (GPU_SUITE_STAGES=$GPU_SUITE_STAGES)"
    "$PY" bench/gpu_report.py record "$name" -1 0 "$budget" >> "$STAGES"
    return 0
  fi
  t=$(( LIMIT - (SECONDS - START) - RESERVE - 5 ))  # 5: timeout's grace before KILL
  (( budget < t )) && t=$budget
  if (( t < 10 )); then
    say "== $name: skipped, $(( SECONDS - START )) s of $LIMIT s used"
    "$PY" bench/gpu_report.py record "$name" -1 0 "$budget" >> "$STAGES"
    return 0
  fi
  say "== $name (up to ${t} s; $(( SECONDS - START )) s used): $*"
  t0=$SECONDS
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "== $name: exit $rc after $(( SECONDS - t0 )) s"
  # Should the record itself fail, a plain one still says that the stage did not pass.
  "$PY" bench/gpu_report.py record "$name" "$rc" "$(( SECONDS - t0 ))" "$t" "${junit[@]}" >> "$STAGES" ||
    printf '{"stage": "%s", "rc": %d, "status": "failed", "seconds": %d, "budget_s": %d}\n' \
      "$name" "$rc" "$(( SECONDS - t0 ))" "$t" >> "$STAGES"
}

# The install stage's command (run under `timeout`, so a string for bash -c, not a function):
# the wheels into the scratch site folder, then an import of what the stages need, from
# where they will import it.
export PY SCRATCH
INSTALL='"$PY" bench/gpu_wheels.py install --target "$SCRATCH/site" || exit 1
PYTHONPATH=$PYTHONPATH:$SCRATCH/site "$PY" -c "
import deepspeed, megatron.core, webdataset, megatron_transnormer.training.runtime, transnormer_kernels
print(\"imported deepspeed\", deepspeed.__version__, \"from\", deepspeed.__file__)
print(\"imported transnormer_kernels from\", transnormer_kernels.__file__)
try:
    import fla.ops.simple_gla
    print(\"imported fla from\", fla.__file__)
except Exception as exc:
    print(\"fla not importable (the kernel benchmark skips it):\", type(exc).__name__, exc)
"'

"$PY" bench/gpu_report.py env >> "$STAGES" 2>>"$LOG" || echo '{"stage": "env"}' >> "$STAGES"
say "gpu_suite: $( (( DRY )) && echo 'dry run, ' )python $PY, output $OUTDIR, limit $LIMIT s"

if (( DRY )); then
  run_stage install 60 "$PY" bench/gpu_wheels.py check
  SMOKE=(--cpu-smoke)
  TRAIN=(--dry-run --run-timeout 120)
else
  # The site folder goes on PYTHONPATH after the repository, so the checkout's own code wins
  # over the project wheel (which is installed to show that it installs).
  run_stage install 40 bash -c "$INSTALL"
  export PYTHONPATH=$PYTHONPATH:$SCRATCH/site
  SMOKE=()
  # Per run: 10 untimed updates, then up to 200 (kernels on/off) or 20 (long context) timed
  # ones within 25 / 10 s; a run's first updates also compile and autotune the kernels.
  TRAIN=(--config scale/385m --steps 200 --warmup 10 --max-seconds 25 --long-lengths 2048,8192,32768
         --long-tokens 32768 --long-steps 20 --long-max-seconds 10 --run-timeout 100)
fi

run_stage tests 100 --junit "$SCRATCH/pytest.xml" \
  "$PY" -m pytest -q -m gpu tests/kernels -p no:cacheprovider --junitxml="$SCRATCH/pytest.xml"
run_stage kernels_norm 60 "$PY" bench/kernels.py "${SMOKE[@]}" --out "$OUTDIR/kernels_norm.json"
run_stage kernels_decay 40 "$PY" bench/kernels.py "${SMOKE[@]}" --decay --out "$OUTDIR/kernels_decay.json"
run_stage kernels_diag 25 "$PY" bench/kernels.py "${SMOKE[@]}" --diag --out "$OUTDIR/kernels_diag.json"
run_stage kernels_rms 15 "$PY" bench/kernels.py "${SMOKE[@]}" --rms --out "$OUTDIR/kernels_rms.json"
run_stage train 200 "$PY" bench/train_throughput.py "${TRAIN[@]}" --out "$OUTDIR/train_throughput.json"

say "== report ($(( SECONDS - START )) s used)"
timeout -k 2 "$RESERVE" "$PY" bench/gpu_report.py report "$OUTDIR" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
# The suite's own exit code: the report was written and every stage ran and passed.
failed=$(grep -c '"status": "\(failed\|timed out\|skipped\)"' "$STAGES")
say "gpu_suite: done in $(( SECONDS - START )) s; $failed stage(s) failed, timed out or skipped; report exit $rc"
(( rc == 0 && failed == 0 ))
