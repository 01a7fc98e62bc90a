"""Repository-level pytest setup. The tests run tiny networks, for which more than one torch thread only
adds overhead (and thrashes badly when other processes share the 2 cores)."""
import torch

torch.set_num_threads(1)
