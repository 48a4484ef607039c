"""CPU kernels below the model: GGUF block matmuls (blocks), paged attention and RMSNorm (attention), built from
csrc/ by the system compiler on first use (library), and what this CPU can do (cpu)."""
