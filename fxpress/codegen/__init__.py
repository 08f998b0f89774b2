"""From the rewritten ATen graph to code: scheduling nodes into kernels, and the emitters."""
