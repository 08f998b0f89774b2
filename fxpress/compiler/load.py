"""``fxpress.load``: an artifact folder (``fxpress.compiler.artifact``) as a callable module.

Every file is checked against meta.json first. Then the constants are rebuilt from
weights.safetensors with their recorded layouts, the state the graph writes gets its initial
value (the compressed KV state belongs to those buffers, so each loaded model has its own), each
rewritten attention layer's KV site is found or made from its recorded policy and shape, and the
generated wrapper is imported with its KV handles pointing at those sites. Nothing is unpickled
and no pass runs.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from fxpress.compiler import artifact
from fxpress.compiler.artifact import ArtifactError
from fxpress.kv import graph_state
from fxpress.kv.policies import POLICIES
from fxpress.runtime.program import load_wrapper
from fxpress.runtime.wrapper_support import InputError


class LoadedModel(torch.nn.Module):
    """An artifact, callable like the model it was compiled from (same arguments, same outputs)."""

    def __init__(self, folder: Path, meta: dict[str, Any], call: Callable[[list[Any]], Any],
                 state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.folder, self.meta, self._call = folder, meta, call
        self._state = state
        self._in_spec = pytree.treespec_loads(meta["in_spec"])
        self._out_spec = _output_spec(meta["out_spec"])
        self._kwarg_names = meta["kwargs"]
        self._dtypes = [getattr(torch, spec["dtype"]) for spec in meta["inputs"]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        where = f"fxpress artifact {self.folder}"
        if set(kwargs) != set(self._kwarg_names):
            raise InputError(f"{where}: takes keyword inputs {self._kwarg_names}, got {sorted(kwargs)}")
        flat, spec = pytree.tree_flatten((args, {k: kwargs[k] for k in self._kwarg_names}))
        if spec != self._in_spec:
            names = [s["name"] for s in self.meta["inputs"]]
            raise InputError(f"{where}: takes inputs {names}; got {len(args)} positional and "
                             f"{sorted(kwargs)} keyword inputs of another structure")
        self._check(flat, where)
        inputs = [self._state[x] if kind == "state" else flat[x] for kind, x in self.meta["runtime_inputs"]]
        with torch.no_grad():
            outputs = self._call(inputs)
        return pytree.tree_unflatten(list(outputs), self._out_spec)

    def _check(self, flat: list[Any], where: str) -> None:
        bound: dict[str, int] = {}
        for value, spec, dtype in zip(flat, self.meta["inputs"], self._dtypes):
            expected = f"{spec['dtype']}[{', '.join(map(str, spec['shape']))}]"
            ok = isinstance(value, torch.Tensor) and value.dtype == dtype and value.dim() == len(spec["shape"])
            if ok:
                for size, want in zip(value.shape, spec["shape"]):
                    if isinstance(want, str):
                        ok = ok and bound.setdefault(want, int(size)) == int(size)
                    else:
                        ok = ok and int(size) == want
            if not ok:
                got = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}" \
                    if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputError(f"{where}: input {spec['name']} must be {expected}, got {got}"
                                 + (f" (with {bound})" if bound else ""))
            if str(value.device) != self.meta["device"]:
                raise InputError(f"{where}: input {spec['name']} is on {value.device}; the artifact runs on "
                                 f"{self.meta['device']}")

    def extra_repr(self) -> str:
        return f"{self.folder}, target={self.meta['target']}, device={self.meta['device']}"


# Output containers from these packages are registered with pytree when their module is imported.
_OUTPUT_PACKAGES = ("transformers.",)


def _output_spec(text: str) -> pytree.TreeSpec:
    """The outputs' pytree spec. A container type from transformers (a ModelOutput) is registered
    by importing its module, which a fresh process may not have done; no other module is imported."""
    def types(node: Any) -> list[str]:
        return [node["type"]] + [t for child in node["children_spec"] for t in types(child)] if node["type"] else []
    for name in types(json.loads(text)[1]):
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and name.startswith(_OUTPUT_PACKAGES):
            importlib.import_module(name.rpartition(".")[0])
    try:
        return pytree.treespec_loads(text)
    except NotImplementedError as e:
        raise ArtifactError(f"the artifact's outputs use a container pytree cannot rebuild here: {e}") from None


def _policy(record: dict[str, Any]) -> Any:
    classes = {cls.__name__: cls for cls in POLICIES}
    cls = classes.get(record.get("class"))
    if cls is None:
        raise ArtifactError(f"unknown KV policy {record.get('class')!r} in meta.json")

    def tuples(v: Any) -> Any:
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v
    return cls(**{k: tuples(v) for k, v in record["fields"].items()})


def load(path: str | Path) -> LoadedModel:
    """The artifact at ``path`` as a callable module; refuses a changed, truncated or incomplete
    folder, or one written by other fxpress / torch / triton versions, naming the problem."""
    from safetensors.torch import load as load_tensors

    from fxpress.compiler import flags

    folder = Path(path)
    meta = artifact.read_meta(folder)
    files = artifact.verify(folder, meta)
    device = torch.device(meta["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{folder} was compiled for {device}; this machine has no CUDA device")
    if meta["target"] == "triton" and device.type == "cpu" and not flags.TRITON_INTERPRET.get():
        raise ArtifactError(f"{folder} runs Triton kernels on CPU tensors: set TRITON_INTERPRET=1 to run them "
                            "in Triton's interpreter, or compile it with target='cpu'")
    try:
        stored = load_tensors(files["weights.safetensors"])
    except Exception as e:
        raise ArtifactError(f"{folder}/weights.safetensors cannot be read: {e}") from None
    constants = {}
    for name, record in meta["constants"].items():
        flat = stored[record["key"]].to(device)
        constants[name] = torch.empty_strided(record["size"], record["stride"], dtype=flat.dtype, device=device)
        constants[name].copy_(flat.view(record["size"]))
    state = {x: stored[f"state/{x}"].to(device) for kind, x in meta["runtime_inputs"] if kind == "state"}
    handles = {}
    for record in meta["kv_states"]:
        kv = graph_state.site(_policy(record["policy"]), record["layer"], record["max_len"], record["where"])
        handles[record["handle"]] = kv.handle
    module = load_wrapper(files["wrapper.py"].decode(), constants, kv_handles=handles)
    return LoadedModel(folder, meta, module.call, state)
