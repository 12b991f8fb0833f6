# The body of the SLURM batch scripts launch/alm.slurm and launch/blm.slurm: pretraining
# on an allocation of any number of nodes. Not run on its own: a batch script sets
#   launcher        its own name, for messages (sbatch runs a spool copy, so $0 cannot tell)
#   default_config  the --config used when the command line gives none (empty: pretrain.py's)
#   REPO_DIR        the checkout (sbatch copies only the batch script, so this file is
#                   found there, never next to $0)
# and sources this file with its arguments, so that the USR1 trap below is installed in
# the batch shell itself, the one `--signal=B:USR1@N` signals. It ends that shell with
# the training step's exit status.
#
# One SLURM task per training process (one per GPU on GPU nodes); pretrain.py reads
# its rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the rendezvous from
# MASTER_ADDR/MASTER_PORT, which this script derives from the allocation.
#
# Time limits and preemption: shortly before the limit SLURM sends USR1 to the batch
# shell; it is forwarded to the training step, which saves a checkpoint at the next
# step boundary and exits 0; the job then requeues itself, and the requeued run
# (SLURM_RESTART_COUNT >= 1) resumes from the latest complete checkpoint.
#
# Logs: the training output of each attempt goes to <run_dir>/logs/.
#
# Environment knobs (export them before sbatch; the job inherits the environment):
#   REPO_DIR         the checkout to run from (default: the directory sbatch ran in)
#   VENV             virtual environment (default: $REPO_DIR/.venv when it exists)
#   PYTHON           interpreter (default: $VENV/bin/python, else python3)
#   CONTAINER_IMAGE  run the steps in this image via pyxis/enroot (srun --container-image);
#                    the checkout is mounted at the same path, the image brings the
#                    dependencies (see docker/Dockerfile)
#   CONTAINER_MOUNTS extra container mounts, src:dst[,src:dst]
#   RUN_DIR          run directory (default: the config's train.run_dir)
#   MASTER_PORT      rendezvous port (default: derived from the job id)
#   PREPARE_DATA     1 (default): prepare a bundled corpus (tools/prepare_data.py --bundled:
#                    data/shakespeare, data/shakespeare-mlm) if the config points at it and it is missing
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  the network interface between nodes
if [ -z "${launcher:-}" ] || [ -z "${REPO_DIR:-}" ]; then
    echo "launch/train_job.sh: the body of launch/alm.slurm and launch/blm.slurm; sbatch one of those" >&2
    exit 2
fi
set -uo pipefail
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "$launcher: submit it with sbatch (or run it inside an salloc allocation)" >&2
    exit 2
fi

cd "$REPO_DIR" || exit 1
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
VENV="${VENV:-$REPO_DIR/.venv}"
if [ -z "${PYTHON:-}" ]; then
    if [ -z "$CONTAINER_IMAGE" ] && [ -x "$VENV/bin/python" ]; then PYTHON="$VENV/bin/python"
    elif [ -n "$CONTAINER_IMAGE" ]; then PYTHON=python
    else PYTHON=python3; fi
fi
restart="${SLURM_RESTART_COUNT:-0}"
args=("$@")
if [ -n "$default_config" ]; then
    given=0
    for a in "${args[@]}"; do
        case "$a" in --config|--config=*) given=1 ;; esac
    done
    [ "$given" = 1 ] || args=(--config "$default_config" "${args[@]}")
fi

say() { echo "[$launcher $(date -u +%H:%M:%S)] $*"; }

# --- run directory and data, read from the config as pretrain.py will read them ---
if [ -n "${RUN_DIR:-}" ]; then
    args+=("train.run_dir=$RUN_DIR")
fi
resolved="$("$PYTHON" - "${args[@]}" 2>/dev/null <<'EOF'
import os, sys
from megatron_transnormer.config import load_config
from megatron_transnormer.data.prepare import BUNDLED
argv, config, overrides = sys.argv[1:], None, []
while argv:
    a = argv.pop(0)
    if a == "--config" and argv:
        config = argv.pop(0)
    elif a.startswith("--config="):
        config = a.split("=", 1)[1]
    elif "=" in a and not a.startswith("-"):
        overrides.append(a)
cfg = load_config(config, overrides)
print(cfg.train.run_dir)
print(cfg.data.path)
name = os.path.basename(os.path.normpath(cfg.data.path))
print(name if name in BUNDLED else "")  # a corpus tools/prepare_data.py --bundled makes
EOF
)"
bundled=""
if [ -n "$resolved" ]; then
    RUN_DIR="$(sed -n 1p <<<"$resolved")"
    DATA_PATH="$(sed -n 2p <<<"$resolved")"
    bundled="$(sed -n 3p <<<"$resolved")"
else
    # No usable interpreter on this host (e.g. everything lives in the image): name
    # the run directory ourselves; requeued attempts keep the job id, so they find it.
    RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-${launcher%.slurm}}-${SLURM_JOB_ID}}"
    args+=("train.run_dir=$RUN_DIR")
    DATA_PATH=""
fi
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"
train_log="$LOG_DIR/train-${SLURM_JOB_ID}-attempt${restart}.log"

# --- rendezvous from the allocation ---
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
# The address SLURM itself uses to reach the node works even where node names do not
# resolve; it is the node name when the cluster sets no NodeAddr.
node_addr="$(scontrol show node "$first_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
export MASTER_ADDR="${MASTER_ADDR:-${node_addr:-$first_node}}"
# The same port for every attempt of a job, below the kernel's ephemeral port range.
export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export PYTHONUNBUFFERED=1

container_args=()
if [ -n "$CONTAINER_IMAGE" ]; then
    container_args=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR"
                    --container-mounts="$REPO_DIR:$REPO_DIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi

# --- a bundled corpus, prepared once if the config points at it and it is missing ---
if [ "${PREPARE_DATA:-1}" = 1 ] && [ -n "$bundled" ] && [ ! -e "$DATA_PATH/manifest.json" ]; then
    say "preparing $DATA_PATH"
    srun --nodes=1 --ntasks=1 "${container_args[@]}" \
        "$PYTHON" tools/prepare_data.py --bundled "$bundled" --output "$DATA_PATH" || exit 1
fi

# A requeued attempt always resumes, whatever the config says.
if [ "$restart" -ge 1 ]; then
    args+=("train.resume=auto")
fi

# --- preemption: forward USR1 to the step, requeue once it has checkpointed ---
got_usr1=0
step_pid=""
on_usr1() {
    got_usr1=1
    say "USR1 received: asking the training step to checkpoint and stop"
    [ -n "$step_pid" ] && kill -USR1 "$step_pid" 2>/dev/null
}
trap on_usr1 USR1
# On scancel or preemption SLURM signals the steps itself; keep waiting for them.
trap 'say "TERM received: waiting for the training step"' TERM

say "job $SLURM_JOB_ID attempt $restart: $SLURM_NNODES node(s), $SLURM_NTASKS task(s)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR, log $train_log"
# srun passes USR1 on to every task of the step.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --label \
    --output="$train_log" --open-mode=append "${container_args[@]}" \
    "$PYTHON" pretrain.py "${args[@]}" &
step_pid=$!
# `wait` returns early whenever a trapped signal arrives; wait again until srun is gone.
while :; do
    wait "$step_pid"
    rc=$?
    kill -0 "$step_pid" 2>/dev/null || break
done
say "training step exited with $rc"

if [ "$got_usr1" = 1 ] && [ "$rc" = 0 ]; then
    if grep -q "after signal" "$train_log"; then
        say "requeueing job $SLURM_JOB_ID; the next attempt resumes from the checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    else
        say "training had finished before the signal took effect; not requeueing"
    fi
fi
exit "$rc"
