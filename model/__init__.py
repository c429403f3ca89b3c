"""bertforge model: megatron-core BERT with a per-layer choice of self-attention."""
