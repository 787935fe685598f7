"""Example loom StreamFlows wrapped by the example code location."""
