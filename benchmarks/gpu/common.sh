# Sourced by the GPU scripts of benchmarks/gpu (run.sh, scaleout.sh).

# The pytest option that loads the suite's plugin: none where the package is installed (its pytest11 entry point
# loads it; naming it again with -p fails, "Plugin already registered under a different name"), `-p
# efficiency.plugin` in a bare checkout on PYTHONPATH (how the GPU leases run it). Usage: plugin=$(plugin_option "$py")
plugin_option() {
  "$1" -c "import importlib.metadata as m, sys
sys.stdout.write('' if any(e.value == 'efficiency.plugin' for e in m.entry_points(group='pytest11')) else '-p efficiency.plugin')"
}
