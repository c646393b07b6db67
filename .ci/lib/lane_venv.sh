# Sourced by lanes (not a lane itself: .ci/run runs only .ci/lanes/*.sh).
#
# lane_venv DIR PINS: make DIR a venv on top of the project's .venv (torch,
# megatron-core and the project's editable install come from there through a
# .pth) holding the packages pinned in PINS. It lives outside the work tree
# (nothing for git to see) and is rebuilt only when the pins or the project venv
# it sits on change, the latter by the real path of its site-packages: a checkout
# whose .venv links to another checkout's reuses that one's lane venvs instead
# of rebuilding them. Run from the repository root.
lane_venv() {
  local venv=$1 pins=$2 project_site stamp py312 lane_site
  project_site=$(.venv/bin/python -c 'import os, site; print(os.path.realpath(site.getsitepackages()[0]))')
  stamp=$( (cat "$pins"; echo "$project_site") | sha256sum | cut -c1-16)
  if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
    py312=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
    rm -rf "$venv"
    "$py312" -m venv "$venv"
    lane_site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    # addsitedir (not a bare path) so the project's editable install is seen too.
    echo "import site; site.addsitedir('$project_site')" > "$lane_site/_project_venv.pth"
    "$venv/bin/python" -m pip install --quiet --no-deps -r "$pins"
    echo "$stamp" > "$venv/.installed"
  fi
}
