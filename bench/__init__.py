"""Benchmarks, each a command (`python -m bench.<name>`): like the CLI, they drop the start-up warnings that say
nothing about a run (`runtime.quiet`) before anything imports transformers."""

from flamingo.runtime.quiet import quiet_irrelevant_warnings

quiet_irrelevant_warnings()
