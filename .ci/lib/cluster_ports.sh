# Sourced by lanes (not a lane itself: .ci/run runs only .ci/lanes/*.sh).
#
# cluster_ports: export NLF_SLURMCTLD_PORT and NLF_SLURMD_PORT, two distinct free
# ports for the next examples/slurm/local_cluster.sh, so that a developer's
# cluster on the same machine (or another CI run's) is neither reused nor stopped.
# Both sockets are bound at once, so the two ports differ. Run from the repository root.
cluster_ports() {
  read -r NLF_SLURMCTLD_PORT NLF_SLURMD_PORT < <(.venv/bin/python - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
  export NLF_SLURMCTLD_PORT NLF_SLURMD_PORT
}
