"""One hook primitive for the whole library.

Example::

    with Trace(model, "model.layers.3.mlp.down_proj", retain_input=True) as t:
        model(input_ids)
    keys = t.input                      # (batch, seq, d_ff)

Every part of neuraldb (key capture, residual optimisation, gated retrieval,
evaluation) goes through :class:`Trace` / :class:`TraceDict`. Hooks are always
removed in ``finally``: an exception inside the ``with`` block, or the
:class:`StopForward` raised by ``stop=True``, leaves the model exactly as it was.

Two acts every part repeats have one function each here: :func:`layer_input` (a
module's input, running the forward only up to that module) and
:func:`cache_argument` / :func:`cache_of` (the KV cache under either of its names).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .threads import PerThread

__all__ = ["StopForward", "Trace", "TraceDict", "cache_argument", "cache_of", "get_module", "layer_input"]

# The KV cache's keyword, newest first: transformers 5 renamed ``past_key_values`` to ``cache``.
CACHE_NAMES = ("cache", "past_key_values")


class StopForward(Exception):
    """Raised inside a hook to abort the forward pass once a traced layer has run.

    ``Trace(..., stop=True)`` raises it and swallows it on exit, so::

        with Trace(model, name, stop=True) as t:
            model(x)          # returns early, nothing after ``name`` runs
    """


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (dotted path), with a clear error."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise LookupError(
            f"module {name!r} not found in {type(model).__name__}; "
            "check the architecture templates (neuraldb.arch) for this model family"
        ) from exc


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


class Trace(contextlib.AbstractContextManager):
    """Hook one module: retain its input/output, edit its output, stop, or bypass it.

    Args (keyword-only after ``layer``):
        retain_input: keep the module's first positional input in ``self.input``.
        retain_output: keep its output (the first tensor of a tuple) in ``self.output``.
        edit_output: ``fn(output_tensor, module_input_tensor) -> tensor`` replacing the
            output's first tensor (tuples handled).
        bypass: ``fn(*args, **kwargs) -> output`` called *instead of* the module's
            forward (the module's own computation is skipped).
        retain_call: keep the positional and keyword arguments of each call in
            ``self.call_args`` / ``self.call_kwargs`` (a forward pre-hook); per thread: each
            thread reads its own last call, so threads may call the model concurrently.
        stop: raise :class:`StopForward` after the module ran; swallowed on exit.
        detach: detach retained tensors from the graph (default True).
        clone: clone retained tensors (default False).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        bypass: Callable[..., Any] | None = None,
        retain_call: bool = False,
        stop: bool = False,
        detach: bool = True,
        clone: bool = False,
    ) -> None:
        self.layer = layer
        self.module = get_module(model, layer)
        self.stop = stop
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.output_is_tuple = False
        self._call = PerThread()  # this thread's last call: .args, .kwargs (retain_call)
        self._bypass = bypass
        self._handle = None
        self._pre_handle = None

        def keep(t: torch.Tensor) -> torch.Tensor:
            if detach:
                t = t.detach()
            return t.clone() if clone else t

        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            x = inputs[0] if inputs else None
            if retain_input and x is not None:
                self.input = keep(x)
            self.output_is_tuple = isinstance(output, tuple)
            if edit_output is not None:
                output = _replace_first(output, edit_output(_first_tensor(output), x))
            if retain_output:
                self.output = keep(_first_tensor(output))
            if stop:
                raise StopForward(layer)
            return output

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._call.args, self._call.kwargs = args, kwargs

        try:
            if retain_call:
                self._pre_handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            self._handle = self.module.register_forward_hook(hook)
            if bypass is not None:
                # An instance attribute shadows nn.Module.forward; removed in close().
                self.module.forward = bypass  # type: ignore[method-assign]
        except BaseException:
            self.close()
            raise

    @property
    def call_args(self) -> tuple:
        """The positional arguments of this thread's last call (``retain_call``; () before one)."""
        return getattr(self._call, "args", ())

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of this thread's last call (``retain_call``; {} before one)."""
        return getattr(self._call, "kwargs", {})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        if self._bypass is not None and "forward" in self.module.__dict__:
            del self.module.forward
            self._bypass = None

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return self.stop and exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Trace several modules at once; ``td[name]`` is that module's :class:`Trace`.

    Example::

        with TraceDict(model, ["model.layers.0", "model.layers.1"]) as td:
            model(x)
        h1 = td["model.layers.1"].output      # (batch, seq, d_model)

    ``edit_output`` / ``bypass`` receive the layer name as a keyword ``layer=``.
    ``stop=True`` stops after the last listed layer.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Callable[..., torch.Tensor] | None = None,
        bypass: Callable[..., Callable[..., Any]] | None = None,
        stop: bool = False,
        detach: bool = True,
        clone: bool = False,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(layers))
        self.stop = stop
        try:
            for i, name in enumerate(names):
                self[name] = Trace(
                    model,
                    name,
                    retain_input=retain_input,
                    retain_output=retain_output,
                    edit_output=(
                        None
                        if edit_output is None
                        else (lambda o, x, _n=name: edit_output(o, x, layer=_n))
                    ),
                    bypass=None if bypass is None else bypass(name),
                    stop=stop and i == len(names) - 1,
                    detach=detach,
                    clone=clone,
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for trace in reversed(list(self.values())):
            trace.close()

    def __enter__(self) -> "TraceDict":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return self.stop and exc_type is not None and issubclass(exc_type, StopForward)


def layer_input(model: nn.Module, layer: str, **model_kwargs: Any) -> torch.Tensor:
    """The first positional input of module ``layer`` in one forward ``model(**model_kwargs)``.

    Example::

        keys = layer_input(model, "model.layers.3.mlp.down_proj", input_ids=ids, attention_mask=mask)
        # (batch, seq, d_ff), detached

    The forward stops once ``layer`` has run (nothing after it is computed) and the hook is
    removed in ``finally``. ``use_cache=False`` unless given: nothing is generated. Call it
    under ``torch.no_grad()`` to keep no graph.
    """
    model_kwargs.setdefault("use_cache", False)
    with Trace(model, layer, retain_input=True, retain_output=False, stop=True) as t:
        model(**model_kwargs)
    if t.input is None:
        raise RuntimeError(
            f"module {layer!r} of {type(model).__name__} did not run, or ran without a positional input; "
            "check the architecture templates (neuraldb.arch) for this model family"
        )
    return t.input


def cache_argument(module: nn.Module) -> str | None:
    """The name of ``module.forward``'s KV-cache argument ('cache' or 'past_key_values').

    None when the forward takes neither or has no readable signature.
    """
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_NAMES if name in params), None)


def cache_of(value: Any) -> Any:
    """The KV cache in a model output or in a forward's keyword arguments, under either name.

    The first name present wins (a present ``None`` included); None when neither is.
    Model outputs (a ``Mapping`` holding only their non-None fields) are read by key,
    other objects by attribute.
    """
    for name in CACHE_NAMES:
        if isinstance(value, Mapping):
            if name in value:
                return value[name]
        elif hasattr(value, name):
            return getattr(value, name)
    return None
