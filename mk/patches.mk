# Upstream patch series for megatron-core (patches/README.md).
.PHONY: patches-check patches-checkout patches-export

# Apply the series to the megatron-core 0.19.2 wheel's sources and test it.
patches-check: venv
	PY=$(PY) patches/tools/check.sh

# A working copy to edit the series in: PATCHES_DIR (default /tmp/megatron-core-lossfree).
PATCHES_DIR ?= /tmp/megatron-core-lossfree
patches-checkout: venv
	PYTHON=$(PY) patches/tools/checkout.sh $(PATCHES_DIR)

# Regenerate patches/megatron-core/*.patch from that working copy's branch.
patches-export:
	patches/tools/export.sh $(PATCHES_DIR)
