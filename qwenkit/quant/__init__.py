"""Weight-only quantized formats for fast CPU linear layers: int8 / int4 grouped, loaded from GGUF or quantized."""
