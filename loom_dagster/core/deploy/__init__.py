"""The deploy lifecycle without Dagster: the deployer and its steps, the deployment store and lock, the health gate, restart policy, rewind, orphans."""
