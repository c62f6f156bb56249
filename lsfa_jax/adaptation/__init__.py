"""LSFA adaptation (paper section 3): losses, FIFO memory banks, k-means, training loop."""
