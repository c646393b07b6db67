# Megatron-LM's training loop (docs/megatron_lm.md): `make megatron-lm-test` runs
# .ci/lanes/50-megatron-lm.sh, examples/pretrain_gpt_lossfree.py on 2 CPU ranks, resumed.
.PHONY: megatron-lm-test

megatron-lm-test: venv
	bash .ci/lanes/50-megatron-lm.sh
