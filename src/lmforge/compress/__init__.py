"""Making a model smaller and faster: quantization (RTN, GPTQ, AWQ), pruning (magnitude, Wanda,
SparseGPT) and the checkpoint folders the engine runs them from."""
