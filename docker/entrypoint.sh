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

# The tiny configs read data/shakespeare (alm/tiny_cpu, the default) and
# data/shakespeare-mlm (blm/tiny_cpu); building them takes seconds and needs no network
# (the corpus ships in the shakespeare package); a folder already prepared is kept.
python tools/prepare_data.py --bundled shakespeare --quiet
python tools/prepare_data.py --bundled shakespeare-mlm --quiet
exec python pretrain.py "$@"
