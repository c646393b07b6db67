"""Run a module with the Bridge lane's import stand-ins, CPU redirects and offline hub
(see import_stand_ins.py, bridge_on_cpu.py and offline_hub.py; BRIDGE_ON_CPU=0 skips
the CPU redirects).

    python tests/_support/bridge_lane/run_with_stand_ins.py -m MODULE [ARGS ...]
    torchrun --nproc-per-node 2 tests/_support/bridge_lane/run_with_stand_ins.py -m MODULE [ARGS ...]
    python tests/_support/bridge_lane/run_with_stand_ins.py -m pytest tests/_support/bridge_lane/lane_checks.py
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import import_stand_ins  # noqa: E402
import offline_hub  # noqa: E402

if len(sys.argv) < 3 or sys.argv[1] != "-m":
    sys.exit(__doc__)
offline_hub.install()
import_stand_ins.install()
if os.environ.get("BRIDGE_ON_CPU", "1") == "1":
    import bridge_on_cpu  # noqa: E402

    bridge_on_cpu.install()
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
