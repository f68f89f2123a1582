"""The online loop (Algorithm 1) and what it owns: the annotate step, the held-out check,
checkpoints, the run folder and its report, and the `daralign train` command."""
