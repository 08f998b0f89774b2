"""From the rewritten ATen graph to a running program: the schedule (kernels and buffers), the
memory plan, the targets that generate kernel code, and the wrapper module that runs it all."""
