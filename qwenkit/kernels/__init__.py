"""The CPU kernels below the model: GGUF block matmuls, paged attention and norms in C (csrc/), compiled at install
once per instruction set (build) and loaded for this CPU (library); what the CPU can do (cpu)."""
