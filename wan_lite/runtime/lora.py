"""LoRAs applied unmerged at run time, attached to a model from outside and removed again.

For a DiT whose block Linear layers are quantized (`QuantizedLinear` int8 / fp8 / int4, `GGUFLinear`)
merging would need a float copy of each weight and a new quantization; instead each such layer
(and a plain `nn.Linear` in the blocks) gets a forward hook adding

    y += up @ (down @ x)        up: [out, R] with each LoRA's scale folded in, down: [R, in]

where the LoRAs of one layer are stacked along R (one pair of small GEMMs, in x's dtype, as PEFT
does). A full `.diff` on a quantized weight is an extra dense term in the same hook. Everything
else a LoRA changes is float in wan_lite (norms, modulation, biases, embeddings, head: never
quantized, and the DiT reads the embeddings' and head's weights with F.linear, past any hook): it
is merged into the parameter, in float32 and rounded once, and the original tensor is kept (in
host memory) so `detach_loras` puts it back bit for bit.

Strengths are per model, so the two A14B experts each get their own:
`attach_loras(high, loras, [1.0])`, `attach_loras(low, loras, [0.0])`.

Where the factors live: in the hooks, not in the module's tensors, so state dicts, the quantized
cache, `move_expert` and the block streamer never see them. On the first forward they move to the
device (and dtype) of the layer's input and stay there: `lora_bytes(model)` is what the planner
must count on the compute device for that model; `loras_to(model, "cpu")` sends them back (for an
expert going idle). Attach before the block streamer is attached (it packs the merged tensors).
A model dropped to "disk" and re-filled from its source loses the merged parameters: re-fill it
from `attachment.refill_source(base)`, which merges exactly those as it reads.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wan_lite.loading.lora import LoRAFile, LoRASource
from wan_lite.loading.tensors import TensorSource
from wan_lite.models.fp8_rows import Fp8Rows
from wan_lite.runtime.gguf_linear import GGUFLinear
from wan_lite.runtime.quant import QuantizedLinear, find_block_list
from wan_lite.runtime.streaming import streamer_of

log = logging.getLogger(__name__)

_LINEARS = (nn.Linear, QuantizedLinear, GGUFLinear)


class _LowRank:
    """The forward hook of one layer: output + up(down(x)) (+ dense(x)), in x's dtype.

    x may be an `Fp8Rows` (the fp8 GEMM's input, made by the modulation kernel): the LoRA sees
    its values. A `QuantizedLinear` whose `input_gelu` is set applies a GELU to its input
    internally (the FFN's second layer), so the LoRA applies the same GELU first.
    """

    def __init__(self, down: torch.Tensor | None, up: torch.Tensor | None, dense: torch.Tensor | None) -> None:
        self.down, self.up, self.dense = down, up, dense

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.down, self.up, self.dense) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        self.down, self.up, self.dense = (None if t is None else t.to(device, dtype)
                                          for t in (self.down, self.up, self.dense))

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if isinstance(x, Fp8Rows):
            x = x.dequantized()
        gelu = getattr(module, "input_gelu", None)
        if gelu is not None:
            x = F.gelu(x, approximate=gelu)
        dtype = output.dtype
        ref = self.tensors()[0]
        if ref.device != x.device or ref.dtype != dtype:
            self.to(x.device, dtype)  # once: the factors stay where the layer computes
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        out = output.contiguous()  # a layer's own fresh output: added to in place, no [tokens, out] temporary
        flat = out.view(-1, out.shape[-1])
        if self.down is not None:
            flat.addmm_(F.linear(rows, self.down), self.up.t())  # [tokens, R] is the only temporary
        if self.dense is not None:
            flat.addmm_(rows, self.dense.t())
        return out


@dataclass
class LoRAAttachment:
    """What `attach_loras` did to one model: hooked layers, merged parameters (with their
    originals, in host memory), the LoRAs and strengths, and the notes of the LoRA files."""

    loras: list[tuple[LoRAFile, float]]
    hooks: dict[str, _LowRank] = field(default_factory=dict)
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def merged(self) -> tuple[str, ...]:
        """Names of the parameters and buffers that now hold merged values."""
        return tuple(self.originals)

    def factor_bytes(self) -> int:
        """Bytes of the unmerged terms (low-rank factors and dense deltas) where they are now."""
        return sum(h.nbytes() for h in self.hooks.values())

    def undo_bytes(self) -> int:
        """Host bytes kept to undo the merged parameters."""
        return sum(t.numel() * t.element_size() for t in self.originals.values())

    def refill_source(self, base: TensorSource) -> LoRASource:
        """`base` with the merged parameters merged as read, for re-filling a model dropped to disk
        (`streaming.set_expert_source(model, attachment.refill_source(base))`)."""
        return LoRASource(base, self.loras, only=self.merged)


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, LoRAAttachment] = weakref.WeakKeyDictionary()


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Official parameter name -> shape as in the checkpoint, for every tensor of `model`
    (a `GGUFLinear`'s or an int4 `QuantizedLinear`'s packed weight counts as [out, in], not its bytes)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for name, module in model.named_modules():
        if isinstance(module, (GGUFLinear, QuantizedLinear)):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
    return shapes


def _no_streamer(model: nn.Module) -> None:
    if streamer_of(model) is not None:  # it packs the block tensors: a change now would be lost or stick
        raise RuntimeError("attach or detach LoRAs while no block streamer is attached to the model")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _get(model: nn.Module, name: str) -> torch.Tensor:
    module, attr = _owner(model, name)
    return getattr(module, attr)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module, attr = _owner(model, name)
    if attr in module._parameters:
        module._parameters[attr].data = value  # the Parameter object (and anything holding it) stays
    else:
        module._buffers[attr] = value


def attach_loras(model: nn.Module, loras: Sequence[LoRAFile], strengths: Sequence[float], *,
                 dtype: torch.dtype = torch.bfloat16) -> LoRAAttachment:
    """Apply `loras` at `strengths` to `model` without touching its quantized weights.

    Every LoRA is checked against the model's shapes first: a bad one raises CheckpointError and
    the model is left as it was. LoRAs already attached to the model are detached first.
    dtype: of the unmerged factors until the first forward casts them to the compute dtype.
    Returns the attachment (also found by `attached_loras(model)`).
    """
    if len(loras) != len(strengths):
        raise ValueError(f"{len(loras)} LoRAs but {len(strengths)} strengths")
    _no_streamer(model)
    shapes = layer_shapes(model)
    for lora in loras:
        lora.check(shapes)
    detach_loras(model)  # the merges below start from the base values
    active = [(lora, float(s)) for lora, s in zip(loras, strengths, strict=True) if s != 0]
    block_prefix, blocks = find_block_list(model)
    block_layers = {f"{block_prefix}.{n}": m for n, m in blocks.named_modules() if isinstance(m, _LINEARS)}

    # Work out everything first; the model changes only once all of it is computed.
    lowrank: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dense: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    for lora, strength in active:
        for param, (layer, kind) in lora.params().items():
            current = _get(model, param)
            unmerged = kind == "weight" and layer.module in block_layers
            if unmerged and layer.down:
                down = lora.tensor(layer.down).reshape(layer.rank, -1)
                up = lora.tensor(layer.up).reshape(-1, layer.rank) * layer.scale(strength)
                lowrank.setdefault(layer.module, []).append((down, up))
                if layer.diff is None:
                    continue
            if unmerged and not current.is_floating_point():
                delta = strength * lora.tensor(layer.diff).reshape(shapes[param])
                dense[layer.module] = dense[layer.module] + delta if layer.module in dense else delta
                continue
            if current.device.type == "meta":
                raise RuntimeError(f"cannot merge a LoRA into {param}: the model's tensors are not loaded")
            if param not in merged:
                merged[param] = current.detach().to("cpu", torch.float32, copy=True)  # the deltas are read there
            if unmerged:  # a float weight in the blocks: its full delta merges, its low-rank stays a hook
                merged[param] += strength * lora.tensor(layer.diff).reshape(shapes[param])
            else:
                merged[param] += lora.delta(param, shapes[param], strength)

    attachment = LoRAAttachment(list(zip(loras, strengths, strict=True)),
                                notes=tuple(n for lora in loras for n in lora.notes))
    for param, value in merged.items():
        current = _get(model, param).detach()  # the tensor itself, not the Parameter whose .data changes
        attachment.originals[param] = current.to("cpu")
        _set(model, param, value.to(current.device, current.dtype))
    for module in sorted(set(lowrank) | set(dense)):
        pairs = lowrank.get(module, [])
        down = torch.cat([d for d, _u in pairs]).to(dtype) if pairs else None
        up = torch.cat([u for _d, u in pairs], dim=1).to(dtype) if pairs else None
        hook = _LowRank(down, up, None if module not in dense else dense[module].to(dtype))
        attachment.hooks[module] = hook
        attachment.handles.append(model.get_submodule(module).register_forward_hook(hook))
    _ATTACHED[model] = attachment
    if active:
        log.info("LoRA %s on %d layers unmerged (%.1f MB), %d tensors merged",
                 ", ".join(f"{lora.name} x{s:g}" for lora, s in active), len(attachment.hooks),
                 attachment.factor_bytes() / 1e6, len(merged))
    return attachment


def detach_loras(model: nn.Module) -> None:
    """Remove the hooks and put the merged parameters' original tensors back (bit for bit).
    A parameter dropped to meta (the model on "disk") stays dropped: re-fill it from the base."""
    if model not in _ATTACHED:
        return
    _no_streamer(model)
    attachment = _ATTACHED.pop(model)
    for handle in attachment.handles:
        handle.remove()
    for param, original in attachment.originals.items():
        current = _get(model, param)
        if current.device.type != "meta":
            _set(model, param, original.to(current.device))


def attached_loras(model: nn.Module) -> LoRAAttachment | None:
    return _ATTACHED.get(model)


def lora_bytes(model: nn.Module) -> int:
    """Bytes of the unmerged LoRA terms attached to `model` (0 without any): the planner counts
    them on the device `model` computes on."""
    attachment = _ATTACHED.get(model)
    return 0 if attachment is None else attachment.factor_bytes()


def loras_to(model: nn.Module, device: torch.device | str) -> None:
    """Move the unmerged LoRA terms of `model` to `device` (e.g. "cpu" when the expert goes idle)."""
    attachment = _ATTACHED.get(model)
    for hook in [] if attachment is None else attachment.hooks.values():
        hook.to(device)


# ------------------------------------------------------------------------ a job's LoRAs on a model
@dataclass
class _InUse:
    """What `use_loras` last put on a model: the (file, strength) pairs, how, and the base source."""

    key: tuple[tuple[str, float], ...]
    how: str  # "merged", "unmerged" or "none"
    base: TensorSource | None
    params: tuple[str, ...] = ()  # merged: the parameters that hold merged values


_IN_USE: weakref.WeakKeyDictionary[nn.Module, _InUse] = weakref.WeakKeyDictionary()


def _float_blocks(model: nn.Module) -> bool:
    """Every Linear in the blocks is a plain float nn.Linear (nothing quantized to re-quantize)."""
    _prefix, blocks = find_block_list(model)
    return all(type(m) is nn.Linear and m.weight.is_floating_point() for m in blocks.modules()
               if isinstance(m, _LINEARS))


def use_loras(model: nn.Module, loras: Sequence[LoRAFile], strengths: Sequence[float]) -> str:
    """Make `model` carry exactly `loras` at `strengths` (a strength of 0 drops that LoRA), whatever
    it carried before; returns how: "merged", "unmerged" or "none".

    Merged where the blocks are float and the model was loaded from a source that can be read
    again (`streaming.set_expert_source`): each tensor a LoRA changes is read again from that
    source with the LoRAs merged as it is read (float32, rounded once) and copied into the model's
    tensor where it is (RAM, GPU, or a block's packed host buffer); a LoRA taken off is undone the
    same way, from the source, so no copy of the originals is kept and strength 0 is the plain
    model bit for bit. The model's refill source becomes the merging one, so an expert dropped to
    disk comes back merged. Otherwise (quantized or GGUF blocks: merging would mean quantizing
    again) the LoRAs are attached unmerged (`attach_loras`). Every LoRA is checked against the
    model before anything changes. No block streamer may be attached (between jobs it is not)."""
    from wan_lite.runtime import streaming

    active = [(lora, float(s)) for lora, s in zip(loras, strengths, strict=True) if s != 0]
    key = tuple((str(lora.path), s) for lora, s in active)
    state = _IN_USE.get(model)
    if state is not None and state.key == key:
        return state.how
    shapes = layer_shapes(model)
    for lora, _s in active:
        lora.check(shapes)
    _no_streamer(model)
    base = _base(model)
    merged_before = state.params if state is not None and state.how == "merged" else ()
    if state is not None and state.how == "unmerged":
        detach_loras(model)
    refill = base
    if active and base is not None and _float_blocks(model):
        how = "merged"
        params = tuple(sorted({p for lora, _s in active for p in lora.params()}))
        _refill(model, base, [p for p in merged_before if p not in params])
        refill = LoRASource(base, active)
        _refill(model, refill, params, plain=frozenset(params) - frozenset(merged_before))
    else:
        params = ()
        if merged_before:
            _refill(model, base, merged_before)  # type: ignore[arg-type]
        how = "unmerged" if active else "none"
        if active:
            attachment = attach_loras(model, [lora for lora, _s in active], [s for _l, s in active])
            refill = attachment.refill_source(base) if base is not None else None
    if refill is not None:
        streaming.set_expert_source(model, refill)
    _IN_USE[model] = _InUse(key, how, base, params)
    if active:
        log.info("LoRA %s %s", ", ".join(f"{lora.name} x{s:g}" for lora, s in active), how)
    return how


def _refill(model: nn.Module, source: TensorSource, params: Sequence[str],
            plain: frozenset[str] = frozenset()) -> None:
    """Read `params` from `source` again into the model's own tensors, in their dtypes and places.
    plain: of those, the ones that hold the base's values now (no LoRA merged): a LoRASource then
    merges into a tensor kept as the base stores it from the tensor itself, without reading the
    base again (a 14B expert on the GPU: 28 GB less from host memory; the same result)."""
    for name in params:
        current = _get(model, name)
        if current.device.type == "meta":  # the model waits on disk: its refill source is set instead
            continue
        with torch.no_grad():
            if isinstance(source, LoRASource):  # merged where the tensor lives (a GPU is far faster)
                at_hand = name in plain and current.dtype == source.base.dtype(name)
                current.data.copy_(source.read(name, current.dtype, device=current.device,
                                               base_values=current if at_hand else None))
            else:
                current.data.copy_(source.read(name, current.dtype))


def _base(model: nn.Module) -> TensorSource | None:
    """The source `model`'s plain tensors can be read again from: the one its first `use_loras`
    found registered (`streaming.set_expert_source`, official key names), which later calls keep."""
    from wan_lite.runtime import streaming

    state = _IN_USE.get(model)
    if state is not None:
        return state.base
    source = streaming._SOURCES.get(model)
    return source[0] if source is not None and source[1] is None else None


def mergeable(model: nn.Module) -> bool:
    """Whether `use_loras` merges into `model` (float blocks and a source to read them from again)."""
    return _base(model) is not None and _float_blocks(model)
