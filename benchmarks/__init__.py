"""Hand-run performance benchmarks of ee_callbacks (issue #9); see docs/performance.md.

    python -m benchmarks.bench_probe                 # target 1 (probe / floor), 3 (memory), 4 (naive baseline)
    python -m benchmarks.bench_training_overhead     # target 2 (training wall time with / without the callbacks)

They are not timed tests: ``tests/test_benchmarks_smoke.py`` only checks that their ``--quick`` modes still run and
that the baselines agree numerically with ``run_probe``.
"""

import os

# Shared machines: OpenMP threads that spin while waiting slow every torch op by an order of magnitude when other
# processes hold the cores (see tests/conftest.py). Passive waiting only takes effect if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
