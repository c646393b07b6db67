# Older Megatron-Core minors (requirements/mcore-versions.txt): `make mcore-versions-test`
# runs .ci/lanes/25-mcore-versions.sh on every pinned minor (CI runs only the oldest),
# one venv per minor under ~/.cache/nemo-lossfree. MCORE_VERSIONS="0.17.1" picks minors;
# MCORE_LANE_MULTI_RANK=all adds the multi-rank tests to every minor (by default only
# the oldest runs them).
.PHONY: mcore-versions-test
MCORE_VERSIONS ?=

mcore-versions-test: venv
	VENV=$(VENV) MCORE_LANE_VERSIONS=all bash .ci/lanes/25-mcore-versions.sh $(MCORE_VERSIONS)
