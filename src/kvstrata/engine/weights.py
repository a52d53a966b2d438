"""Where an engine's weights live: the int8 layout's arrays for the native step (read without torch), and the
LlamaModel, built over the same arrays only when the torch path or a caller asks for it; the torch device
and dtypes made on demand. A mixin of LLMEngine (engine/llm_engine.py), which sets device_name,
dtype_name, kv_dtype_name, device_type, config and max_model_len."""

from __future__ import annotations

import gc
import threading
from typing import TYPE_CHECKING, Any

from kvstrata.engine.layout import int8_model_from_arrays
from kvstrata.engine.setup import build_model, layout_arrays, release_int8_copies, setup_native_decode

if TYPE_CHECKING:
    import torch

    from kvstrata.config import EngineConfig
    from kvstrata.model.llama import LlamaModel


class EngineWeights:
    config: EngineConfig
    device_name: str
    dtype_name: str
    kv_dtype_name: str
    device_type: str
    max_model_len: int

    def _load_weights(self, lm) -> None:
        """The layout's arrays where the layout cache holds this model, else the model built now; a model
        built and stored in the layout cache is let go for the file's arrays, so a first start runs (and
        holds the memory of) every later one."""
        self._lm, self._model, self._model_lock = lm, None, threading.Lock()
        quantization = self.config.quantization
        self._layout = layout_arrays(lm, self.dtype_name, self.device_name, quantization)
        if self._layout is None:
            self._set_torch_threads()
            self._model = build_model(lm, self.dtype_name, self.device_name, quantization)
            self._layout = layout_arrays(lm, self.dtype_name, self.device_name, quantization)
            if self._layout is not None:
                # its modules hold reference cycles: collected now, or a command's start (the collector
                # paused, then everything frozen: startup.py) would keep its weights for good (~240 MB)
                self._model = None
                gc.collect()

    def _native_step(self, pool) -> Any:
        """The native step over the layout's arrays (or the model), or None; the int8 copies it made its own
        give their pages back. Without one, the model is built: every step runs on the torch path."""
        cfg = self.config
        if self._layout is not None:
            from kvstrata.native.decode import LayoutWeights

            weights = LayoutWeights(self._lm.config, self._layout, self.max_model_len)
            native = setup_native_decode(cfg, weights, pool, self.device_name)
        else:
            native = setup_native_decode(cfg, self._model, pool, self.device_name)
        if self._model is not None:
            release_int8_copies(self._model)
        elif native is not None:
            from kvstrata.loader.tensor_file import drop_pages

            for name, a in self._layout.items():  # type: ignore[union-attr]
                if name.endswith(".int8_weight"):
                    drop_pages(a)
        else:
            self._get_model()
        return native

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device(self.device_name)

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def kv_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.kv_dtype_name)

    @property
    def model(self) -> LlamaModel:
        """The LlamaModel (the torch path's); an engine started from the layout cache builds it now, over
        the same arrays the native step was given."""
        return self._get_model()

    def _get_model(self) -> LlamaModel:
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._set_torch_threads()
                    cfg = self.config
                    model = int8_model_from_arrays(self._lm, self._layout) if self._layout is not None else None
                    if model is None:
                        model = build_model(self._lm, self.dtype_name, self.device_name, cfg.quantization)
                    self._set_rope(model)
                    self._model = model
        return self._model

    def _set_torch_threads(self) -> None:
        if self.device_type == "cpu" and self.config.num_threads:
            import torch

            torch.set_num_threads(self.config.num_threads)

    def _set_rope(self, model: LlamaModel) -> None:
        """The model's RoPE tables for max_model_len positions: the layout's (the very table the native step
        reads) where the model came from it, else built."""
        rot = model.rotary
        if rot.cos_table is not None and rot.cos_table.shape[0] >= self.max_model_len:
            rot.cos_table, rot.sin_table = rot.cos_table[: self.max_model_len], rot.sin_table[: self.max_model_len]
        else:
            rot.build_table(self.max_model_len, self.dtype)

