"""The workstation side, never run on a device: the fleet CLI's broker connection
(`connection`), desired-state rollouts and their tracking (`rollout`), what a model needs that
a runtime or the Edge TPU lacks (`compat`), and int8 quantisation (`quantize`)."""
