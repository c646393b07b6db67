"""What users run: the ``nemo-lossfree`` CLI (``cli``, ``commands/``), the CPU
demo (``demo/``), the offline bias simulator (``simulator/``) and SLURM job
rendering (``slurm/``). The library and its integrations never import this
package."""
