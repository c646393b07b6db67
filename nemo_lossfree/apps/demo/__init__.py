"""The ``nemo-lossfree demo``: a small Megatron-Core GPT-MoE trained on the CPU, once per balancing arm.

corpus (data), arms (what differs), settings (flags), model (the GPT-MoE every
arm trains), trainer (one arm with Megatron-Core's DDP, schedules and
optimizer), checkpoint (dist_checkpointing), worker (one rank; torchrun/srun
entry point), launcher (two local ranks), results and plots (what a run
leaves behind).
"""
