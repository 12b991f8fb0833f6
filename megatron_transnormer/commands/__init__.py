"""The project's command lines, one module each, each with `main(argv=None) -> int`.

Installed as console commands (pyproject.toml's [project.scripts]: transnormer-train,
transnormer-prepare, ...) and run from a checkout by the thin scripts pretrain.py and
tools/*.py. Nothing is imported here, so that a command loads only what it needs.
"""
