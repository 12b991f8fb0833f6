"""Training: the DeepSpeed runtime (runtime.py), the loop (loop.py), its command line, metrics,
signals, plots and checkpoints. Import the modules themselves; nothing is re-exported here so
that `pretrain.py` can check settings before the heavy imports."""
