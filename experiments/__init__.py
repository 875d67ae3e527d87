"""Experiment recipes: YAML specs and the runners that execute them (filled by `nmtrain train`)."""
