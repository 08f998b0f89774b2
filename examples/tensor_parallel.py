"""SmolLM2-135M split over ranks with torch.distributed's tensor parallelism, compiled by fxpress.

Every rank loads the model, ``parallelize_module`` shards it (Megatron's split: gate/up by output
features, down by input features, and the attention too when its heads divide evenly), and then:

1. the dense sharded model compiles with ``backend="fxpress"`` (``explain`` shows it): each rank's
   graph holds its shard's matmuls and the all-reduces torch.distributed inserted, with nothing
   left to eager, and its greedy tokens are the unsharded model's;
2. ``fxpress.compress.quantize`` quantises each rank's shard to 4 bits, and the compiled graph
   runs them as ``lut_linear`` between the same collectives;
3. ``fxpress.kv_cache`` keeps each rank's KV heads compressed (KIVI-2).

Run: ``torchrun --nproc-per-node 2 examples/tensor_parallel.py`` — gloo on CPU, nccl on GPUs.
"""

import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fxpress
from fxpress import workloads

NEW = 16

dist.init_process_group()  # gloo for CPU tensors, nccl for CUDA ones
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
mesh = init_device_mesh(device.type, (world,))


def say(words):
    print(f"rank {rank}: {words}\n", end="", flush=True)  # one write: ranks' lines do not interleave


def load():
    model, tokenizer = workloads.load_smollm2()
    return model.to(device), tokenizer


def shard(model):
    plan = {"model.layers.*.mlp.gate_proj": ColwiseParallel(), "model.layers.*.mlp.up_proj": ColwiseParallel(),
            "model.layers.*.mlp.down_proj": RowwiseParallel()}
    config = model.config
    if config.num_key_value_heads % world == 0:  # each rank keeps whole heads
        plan.update({f"model.layers.*.self_attn.{p}_proj": ColwiseParallel() for p in "qkv"})
        plan["model.layers.*.self_attn.o_proj"] = RowwiseParallel()
    parts = "MLP and attention" if len(plan) == 7 else \
        f"MLP only ({config.num_key_value_heads} KV heads do not split over {world} ranks)"
    say(f"sharded the {parts}")
    return parallelize_module(model, mesh, plan)


def generate(model, ids, cache=None):
    kwargs = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)[0, ids.shape[1]:]


def compile_report(model, ids):
    """Compile ``model`` with fxpress on ``ids`` (explain: compiled vs eager, and the graph's ops)."""
    report = fxpress.explain(model, kwargs={"input_ids": ids, "use_cache": False})
    fallbacks = sum(bool(g.fallback_reason) for g in report.graphs)
    ops = {op.split(".")[1]: n for g in report.graphs for op, n in g.ops_after.items()
           if op.startswith(("_c10d_functional", "fxpress.lut_linear"))}
    return f"graphs left to eager {fallbacks}, max |compiled - eager| {report.max_abs_diff:.2g}, ops {ops}"


reference_model, tokenizer = load()
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.to(device)
reference = generate(reference_model, ids)
say(f"unsharded eager: {tokenizer.decode(reference)!r}")

model = shard(load()[0])
say(f"dense, compiled: {compile_report(model, ids)}")
say(f"dense, eager: {NEW} greedy tokens identical to the unsharded model: {torch.equal(generate(model, ids), reference)}")

quantized = fxpress.compress.quantize(model, bits=4, group_size=64).model
say(f"4-bit shards, compiled: {compile_report(quantized, ids)}")
unsharded_4bit = generate(fxpress.compress.quantize(reference_model, bits=4, group_size=64).model, ids)
agree = (generate(quantized, ids) == unsharded_4bit).float().mean().item()
say(f"4-bit shards, eager: greedy agreement with the unsharded 4-bit model {agree:.2f}")
cache = fxpress.kv_cache(model, max_len=ids.shape[1] + NEW, policy=fxpress.KIVI(bits=2))
tokens = generate(model, ids, cache)
whole = fxpress.kv_cache(reference_model, max_len=ids.shape[1] + NEW, policy=fxpress.KIVI(bits=2))
agree = (tokens == generate(reference_model, ids, whole)).float().mean().item()
say(f"KIVI-2 cache: this rank holds {cache.nbytes() / 1024:.0f} KiB of KV ({cache.nbytes() / whole.nbytes():.2f} "
    f"of the unsharded cache); greedy agreement with the unsharded KIVI-2 model {agree:.2f}")
dist.destroy_process_group()
