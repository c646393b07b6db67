"""Exit codes of every entry point: the CLI, the demo worker, the Bridge entry point, SLURM jobs."""

EXIT_OK = 0
#: A failure (an exception, a failed job).
EXIT_FAILED = 1
#: Bad input (flags, a config, the environment): one line naming it, before any work.
EXIT_USAGE = 2
#: Stopped early on request (SIGUSR1/SIGTERM, --exit-after-steps) after saving a
#: checkpoint: run again to continue (EX_TEMPFAIL, "try again"). SLURM job scripts requeue on it.
EXIT_STOPPED = 75
