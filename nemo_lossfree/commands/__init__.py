"""Subcommands of the nemo-lossfree CLI, one module each."""
