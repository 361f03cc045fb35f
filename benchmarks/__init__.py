"""moelab benchmarks: scripts that print tables of ratios measured in one run (see README)."""
