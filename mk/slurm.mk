# SLURM: a local cluster for trying the generated sbatch jobs, and the real-SLURM tests.
#   make slurm-up [SLURM_NODES=2]   install (if needed) and start a local cluster (root; default 1 node)
#   make slurm-test                 the real-SLURM tests against it (then: eval "$$(examples/slurm/local_cluster.sh env)")
#   make slurm-down                 stop it
#   make slurm-ci [SLURM_NODES=2]   what CI runs: up, test, down (down also on failure), on 1 then 2 nodes
#   make slurm-examples             re-render examples/slurm/*.sbatch
.PHONY: slurm-up slurm-down slurm-status slurm-test slurm-ci slurm-examples

SLURM_NODES ?= 1
SLURM_CLUSTER := examples/slurm/local_cluster.sh

slurm-up:
	bash $(SLURM_CLUSTER) start --nodes $(SLURM_NODES)

slurm-down:
	bash $(SLURM_CLUSTER) stop

slurm-status:
	bash $(SLURM_CLUSTER) status

slurm-test: venv
	eval "$$(bash $(SLURM_CLUSTER) env)" && NLF_SLURM_NODES=$(SLURM_NODES) \
	  $(PY) -m pytest -q examples/slurm/test_real_slurm.py

# Without SLURM_NODES on the command line: the lane's own sizes (1 then 2), as in CI.
slurm-ci: venv
	$(if $(filter command line,$(origin SLURM_NODES)),NLF_SLURM_NODES=$(SLURM_NODES)) bash .ci/lanes/40-slurm.sh

slurm-examples: venv
	$(PY) examples/slurm/render_examples.py
