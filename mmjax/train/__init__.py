"""The trainer: objective protocol, sharded state, jitted step, checkpoints, metrics, loop, bench."""
