# Megatron-Bridge (NeMo framework) lane: `make bridge-test` builds a lane venv
# (megatron-bridge 0.6.2 on top of .venv, under ~/.cache/nemo-lossfree) and runs tests/_support/bridge_lane/lane_checks.py.
.PHONY: bridge-test validate-configs

bridge-test: venv
	bash .ci/lanes/30-bridge.sh

# Check every YAML in configs/ (what `make test` also does, in tests/test_configs.py).
validate-configs: venv
	@for f in configs/*.yaml; do $(VENV)/bin/nemo-lossfree validate-config $$f || exit 1; done
