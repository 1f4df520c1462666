# XLA / NCCL settings for nas_jax, kept in ONE place (sourced by the launch scripts).
# Unknown XLA flags abort the process, so only flags known to exist in jax 0.11-0.12 are here.
# Override by exporting XLA_FLAGS yourself before launching (then nothing is added).

if [ -z "${XLA_FLAGS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  # Overlap the data-parallel all-reduces / FSDP all-gathers with compute (multi-GPU).
  export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
fi
# Let JAX take 90% of each GPU's memory up front (the default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# NCCL: uncomment and adapt for your cluster's network (InfiniBand HCA names, socket interface).
# export NCCL_IB_HCA=mlx5
# export NCCL_SOCKET_IFNAME=eth0
# export NCCL_DEBUG=WARN
# NVLink SHARP (multicast): turn it off if NCCL hangs or fails at start on your hosts.
# export NCCL_NVLS_ENABLE=0
