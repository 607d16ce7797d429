"""The benchmark suites (python -m benchmarks.report runs them all)."""
import hybridrag  # noqa: F401  (first: it keeps the checkout's kernels/ folder from shadowing PyPI's `kernels`)
