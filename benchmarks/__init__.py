"""Speed and accuracy benchmarks (not tests); each prints ratios measured in one run."""
