"""The QuantLinear contract every backend implements.

A QuantLinear is a plain ``nn.Module`` (deliberately not an ``nn.Linear`` subclass: code that special-cases
``nn.Linear`` — weight tying, re-initialisation, other quantizers — must not mistake it for a dense layer).
Its persistent buffers carry exactly the checkpoint tensor names, shapes and dtypes that the layer's Packer
declares, so ``from_pretrained`` loads a checkpoint straight into them and ``state_dict()`` saves the same format.

Life cycle: construct (possibly on the meta device) -> the loader fills the buffers -> ``check_loaded`` ->
``post_init`` once -> ``forward``.  ``post_init`` may build extra *non-persistent* buffers (a repacked weight for
a fused kernel) but must leave the persistent, checkpoint-format buffers untouched, so saving still works.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..packing import Packer, TensorLayout, get_packer
from ..quant.int import QuantizedTensor
from ..schemes import LayerSpec

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """Base class: buffers, loading checks and (un)packing; subclasses implement :meth:`forward`.

    Input ``x``: ``[..., in_features]`` in the activation dtype; output ``[..., out_features]``, same dtype.
    """

    backend_name: ClassVar[str] = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        packer_name: str,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.packer_name = packer_name
        self.dtype = dtype
        self.has_bias = bias
        for name, (shape, buf_dtype) in self.expected_buffers().items():
            self.register_buffer(name, torch.empty(shape, dtype=buf_dtype, device=device), persistent=True)
        if not bias:
            self.register_buffer("bias", None)

    # -- layout -------------------------------------------------------------------------------------------------
    @property
    def packer(self) -> Packer:
        return get_packer(self.packer_name)

    def expected_buffers(self) -> TensorLayout:
        """Every persistent buffer: the packer's tensors plus ``bias`` (activation dtype) when the layer has one."""
        layout = dict(self.packer.tensor_shapes_dtypes(self.spec, self.in_features, self.out_features))
        if self.has_bias:
            layout["bias"] = ((self.out_features,), self.dtype)
        return layout

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, sym={s.sym}, packing={self.packer_name!r}, backend={self.backend_name!r}"
        )

    # -- building -----------------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        qt: QuantizedTensor,
        packer_name: str,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> QuantLinear:
        """A ready-to-run layer (``post_init`` already called) on ``qt``'s device, buffers filled by the packer."""
        out_features, in_features = qt.codes.shape
        layer = cls(in_features, out_features, qt.spec, packer_name, bias is not None, dtype, device=qt.codes.device)
        with torch.no_grad():
            for name, tensor in layer.packer.pack(qt).items():
                getattr(layer, name).copy_(tensor)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.post_init()
        return layer

    def quantized_tensor(self) -> QuantizedTensor:
        """The layer's codes, scales and zeros, unpacked from the checkpoint-format buffers (or their CPU copy,
        on the layer's device, after :meth:`offload_checkpoint`)."""
        tensors = self.checkpoint_tensors()
        qt = self.packer.unpack(tensors, self.spec, self.in_features, self.out_features)
        if not self.checkpoint_offloaded:
            return qt
        device = self.device_marker.device
        return QuantizedTensor(qt.codes.to(device), qt.scales.to(device), qt.zeros.to(device), qt.spec)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint-format tensors by name: the registered buffers, or their CPU copy once offloaded."""
        offloaded = self.__dict__.get("_checkpoint_on_cpu")
        if offloaded is not None:
            return dict(offloaded)
        layout = self.packer.tensor_shapes_dtypes(self.spec, self.in_features, self.out_features)
        return {name: getattr(self, name) for name in layout}

    # -- one copy of the weights on an accelerator ------------------------------------------------------------------
    @property
    def checkpoint_offloaded(self) -> bool:
        return "_checkpoint_on_cpu" in self.__dict__

    def offload_checkpoint(self) -> None:
        """Move the checkpoint-format tensors to CPU memory, for backends whose kernel holds its own repacked copy:
        two copies of every weight on a GPU would halve the model size that fits.  ``state_dict()`` and
        :meth:`quantized_tensor` read the CPU copy; the registered buffers stay (holding None) so the names are
        unchanged.  A ``device_marker`` buffer keeps following ``.to()`` to say where the layer runs."""
        if self.checkpoint_offloaded:
            return
        names = list(self.packer.tensor_shapes_dtypes(self.spec, self.in_features, self.out_features))
        device = getattr(self, names[0]).device
        self.__dict__["_checkpoint_on_cpu"] = {name: getattr(self, name).detach().to("cpu") for name in names}
        for name in names:
            setattr(self, name, None)
        self.register_buffer("device_marker", torch.empty(0, device=device), persistent=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self.__dict__.get("_checkpoint_on_cpu", {}).items():
            destination[prefix + name] = tensor

    def post_init(self) -> None:
        """Called once after the weights are loaded; backends that repack for a faster kernel do it here."""

    def _apply(self, fn, recurse: bool = True):
        """``model.to(dtype)`` must not cast quantization state: fp16 checkpoint scales rounded to bf16 would be
        saved that way, and a kernel's table must keep the dtype its kernel reads.  Every buffer but ``bias``
        follows device moves only; ``bias`` (cast in ``forward`` anyway) follows dtype casts as well."""
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None and name != "bias"}
        for name in kept:
            self._buffers[name] = None
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                target = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device  # where fn sends this dtype
                self._buffers[name] = buf if buf.device == target else buf.to(target)
        return result

    # -- validation ---------------------------------------------------------------------------------------------
    def check_loaded(self, layer_name: str) -> None:
        """Raise ``ValueError`` naming the layer and buffer if a buffer is missing, still on meta, of the wrong
        dtype or shape, or (floating point) holds non-finite values; or if the packer cannot unpack the layer.

        Transformers only warns about a missing checkpoint tensor and leaves the buffer uninitialised, so loaders
        call this for every layer before the model is used.
        """
        for name, (shape, dtype) in self.expected_buffers().items():
            buf = getattr(self, name, None)
            where = f"layer {layer_name!r}: buffer {name!r}"
            if not isinstance(buf, torch.Tensor):
                raise ValueError(f"{where} is missing")
            if buf.device.type == "meta":
                raise ValueError(f"{where} is still on the meta device (not loaded from the checkpoint?)")
            if buf.dtype != dtype:
                raise ValueError(f"{where} has dtype {buf.dtype}, expected {dtype}")
            if tuple(buf.shape) != shape:
                raise ValueError(f"{where} has shape {tuple(buf.shape)}, expected {shape}")
            wide = buf.float() if buf.is_floating_point() and buf.element_size() == 1 else buf  # fp8: no isfinite
            if buf.is_floating_point() and not bool(torch.isfinite(wide).all()):
                raise ValueError(f"{where} holds non-finite values (NaN or inf)")
        try:  # what only the packer can judge (g_idx order, stored shapes, value ranges)
            self.packer.check_values(self.checkpoint_tensors(), self.spec, self.in_features, self.out_features)
            self.quantized_tensor()
        except ValueError as err:
            raise ValueError(f"layer {layer_name!r}: {err}") from err

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")
