"""``fxpress.load``: an artifact folder (``fxpress.compiler.artifact``) as a callable module.

Every file is checked against meta.json first. Then the constants are rebuilt from
weights.safetensors with their recorded layouts, the state the graph writes gets its initial
value (the compressed KV state belongs to those buffers, so each loaded model has its own), each
rewritten attention layer's KV site is found or made from its recorded policy and shape, and the
wrapper is generated again from graph.json (the final graph as data) and run with its KV handles
pointing at those sites; it must hash to the recorded wrapper.py, which itself is never run.
Nothing is unpickled, no pass runs, and no code the folder carries is executed.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from fxpress.compiler import artifact, graph_json
from fxpress.compiler.artifact import ArtifactError
from fxpress.codegen.targets import get_target, target_names
from fxpress.compiler.lower import regenerate_wrapper
from fxpress.kv import graph_state
from fxpress.kv.registry import policy_class
from fxpress.runtime.cuda_graphs import CudaGraphRunner
from fxpress.runtime.wrapper_cache import load_wrapper
from fxpress.runtime.wrapper_support import InputError


class LoadedModel(torch.nn.Module):
    """An artifact, callable like the model it was compiled from (same arguments, same outputs)."""

    def __init__(self, folder: Path, meta: dict[str, Any], call: Callable[[list[Any]], Any],
                 state: dict[str, torch.Tensor], cuda_graphs: str = "") -> None:
        super().__init__()
        self.folder, self.meta, self._call = folder, meta, call
        self.cuda_graphs = cuda_graphs  # with load(..., cuda_graphs=True): "on", or "off: why"
        self._state = state
        self._in_spec = _spec(meta["in_spec"], "in_spec")
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
    try:
        names = types(json.loads(text)[1])
    except (json.JSONDecodeError, TypeError, KeyError, IndexError, RecursionError):
        raise ArtifactError("meta.json: field out_spec is not a pytree spec") from None
    for name in names:
        if isinstance(name, str) and name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE \
                and name.startswith(_OUTPUT_PACKAGES) and all(p.isidentifier() for p in name.split(".")):
            try:
                importlib.import_module(name.rpartition(".")[0])
            except ImportError:
                pass  # refused just below, as a container pytree cannot rebuild
    return _spec(text, "out_spec")


def _spec(text: str, field: str) -> pytree.TreeSpec:
    try:
        return pytree.treespec_loads(text)
    except NotImplementedError as e:
        raise ArtifactError(f"the artifact's {field} uses a container pytree cannot rebuild here: {e}") from None
    except Exception as e:  # a crafted spec: JSON of the wrong shape
        raise ArtifactError(f"meta.json: field {field} is not a pytree spec ({type(e).__name__}: {e})") from None


def _policy(record: dict[str, Any]) -> Any:
    cls = policy_class(record.get("class"))
    if cls is None:
        raise ArtifactError(f"unknown KV policy {record.get('class')!r} in meta.json")

    def value(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"class", "fields"}:  # a policy inside a policy (ThinKV's kivi)
            return _policy(v)
        return tuple(value(x) for x in v) if isinstance(v, list) else v
    try:
        return cls(**{k: value(v) for k, v in record["fields"].items()})
    except (TypeError, ValueError) as e:  # OptionError is a ValueError
        raise ArtifactError(f"meta.json: field kv_states[].policy cannot make a {cls.__name__}: {e}") from None


def _regenerated_wrapper(folder: Path, meta: dict[str, Any], files: dict[str, bytes],
                         constants: dict[str, torch.Tensor]) -> str:
    """The wrapper, generated here from graph.json (data) by this fxpress: the artifact's own
    wrapper.py is never run. It must hash to what the artifact recorded, or the artifact was made
    by other code (or tampered with) and is refused."""
    try:
        data = json.loads(files["graph.json"])
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{folder}/graph.json cannot be read: {e}") from None
    final = graph_json.load(data, constants, str(folder))
    try:
        source = regenerate_wrapper(final, meta["target"], "graph 0")
    except Exception as e:
        raise ArtifactError(f"{folder}: the wrapper cannot be regenerated from graph.json: "
                            f"{type(e).__name__}: {e}") from None
    if artifact.sha256(source.encode()) != meta["files"]["wrapper.py"]["sha256"]:
        raise ArtifactError(f"{folder}: the wrapper regenerated from graph.json differs from the recorded "
                            "wrapper.py; the artifact was not written by this fxpress as it stands")
    return source


def load(path: str | Path, cuda_graphs: bool = False) -> LoadedModel:
    """The artifact at ``path`` as a callable module; refuses a changed, truncated or incomplete
    folder, or one written by other fxpress / torch / triton versions, naming the problem.
    ``cuda_graphs``: replay each input layout as a CUDA graph (as ``Options(cuda_graphs=True)``);
    ``loaded.cuda_graphs`` says "on", or "off: " and why (not on a CUDA device, or the graph keeps
    KV state or writes state buffers)."""
    from safetensors.torch import load_file

    folder = Path(path)
    meta = artifact.read_meta(folder)
    _check_values(folder, meta)
    files = artifact.verify(folder, meta)
    device = torch.device(meta["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{folder} was compiled for {device}; this machine has no CUDA device")
    refusal = get_target(meta["target"]).device_refusal(device)
    if refusal is not None:
        raise ArtifactError(f"{folder} {refusal}")
    try:
        stored = load_file(files["weights.safetensors"])  # memory-mapped, not read into bytes first
    except Exception as e:
        raise ArtifactError(f"{folder}/weights.safetensors cannot be read: {e}") from None
    constants = {name: _constant(folder, name, record, stored, device) for name, record in meta["constants"].items()}
    state = {}
    for kind, x in meta["runtime_inputs"]:
        if kind == "state":
            state[x] = _stored(folder, stored, f"state/{x}").to(device)
    handles = {}
    for record in meta["kv_states"]:
        kv = graph_state.site(_policy(record["policy"]), record["layer"], record["max_len"], record["where"])
        handles[record["handle"]] = kv.handle
    module = load_wrapper(_regenerated_wrapper(folder, meta, files, constants), constants, kv_handles=handles)
    if not cuda_graphs:
        return LoadedModel(folder, meta, module.call, state)
    refused = _replay_refusal(meta, device)
    call = module.call if refused else CudaGraphRunner(module.call, module._arenas, f"fxpress artifact {folder}")
    return LoadedModel(folder, meta, call, state, f"off: {refused}" if refused else "on")


def _replay_refusal(meta: dict[str, Any], device: torch.device) -> str | None:
    """``fxpress.ir.replay.replay_refusal`` for an artifact, from what its meta.json records."""
    if device.type != "cuda":
        return f"the artifact runs on {device}, not a CUDA device"
    if meta["kv_states"]:
        return "it keeps compressed KV state on the host"
    if any(kind == "state" for kind, _ in meta["runtime_inputs"]):
        return "it updates state buffers (a KV cache) in place"
    return None


def _check_values(folder: Path, meta: dict[str, Any]) -> None:
    """What the field types (checked with meta.json) do not say: names that must mean something."""
    def refuse(field: str, value: Any, expected: str) -> ArtifactError:
        return ArtifactError(f"{folder}/meta.json: field {field} must be {expected}, got {value!r:.80}")

    if meta["target"] not in target_names() or meta["target"] == "auto":
        raise refuse("target", meta["target"], "a registered target: " + ", ".join(target_names()[1:]))
    try:
        torch.device(meta["device"])
    except (RuntimeError, ValueError):
        raise refuse("device", meta["device"], "a torch device") from None
    for i, spec in enumerate(meta["inputs"]):
        if not isinstance(getattr(torch, spec["dtype"], None), torch.dtype):
            raise refuse(f"inputs[{i}].dtype", spec["dtype"], "a torch dtype")
    n_inputs = len(meta["inputs"])
    for i, entry in enumerate(meta["runtime_inputs"]):
        ok = len(entry) == 2 and (entry[0] == "state" and isinstance(entry[1], str) or
                                  entry[0] == "input" and isinstance(entry[1], int) and 0 <= entry[1] < n_inputs)
        if not ok:
            raise refuse(f"runtime_inputs[{i}]", entry, f'["state", name] or ["input", index < {n_inputs}]')
    for name in meta["files"]:
        artifact.check_name(folder, name)


def _stored(folder: Path, stored: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in stored:
        raise ArtifactError(f"{folder}/weights.safetensors holds no tensor {key!r}, which meta.json names")
    return stored[key]


def _constant(folder: Path, name: str, record: dict[str, Any], stored: dict[str, torch.Tensor],
              device: torch.device) -> torch.Tensor:
    """A constant with its recorded layout, refused when the layout does not fit its stored values."""
    flat = _stored(folder, stored, record["key"])
    size, stride = record["size"], record["stride"]
    numel = math.prod(size)
    extent = 1 + sum((n - 1) * st for n, st in zip(size, stride)) if numel else 0
    if len(size) != len(stride) or numel != flat.numel() or extent > max(flat.numel(), 1):
        raise ArtifactError(f"{folder}/meta.json: field constants[{name!r}] has size {size} and stride {stride}, "
                            f"which do not fit the {flat.numel()} stored values of {record['key']!r}")
    constant = torch.empty_strided(size, stride, dtype=flat.dtype, device=device)
    constant.copy_(flat.to(device).view(size))
    return constant
