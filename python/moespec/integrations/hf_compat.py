"""Version differences of the transformers API that moespec calls, in one place.

transformers 5.24 renamed the model forward's KV-cache argument ``past_key_values`` to ``cache``
(the old name still works there, with a ``FutureWarning``) and model outputs now carry the cache as
``.cache`` (``output.past_key_values`` is a property that logs a deprecation). Older 5.x releases
only know ``past_key_values``. moespec passes and reads the cache through these helpers, so it
uses whichever name the installed version expects and never triggers a deprecation itself:

    out = model(input_ids=ids, **forward_kwargs(model, cache), use_cache=True)
    cache = output_cache(out)

Torch-light: nothing here imports torch or transformers.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["CACHE_ARGUMENTS", "cache_argument", "forward_kwargs", "output_cache"]

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names of the KV-cache argument of a transformers forward, newest first."""

_by_class: dict[type, str] = {}


def _from_signature(forward) -> str | None:
    try:
        params = inspect.signature(forward).parameters  # follows __wrapped__ (deprecate_kwarg & co.)
    except (TypeError, ValueError):
        return None
    for name in CACHE_ARGUMENTS:
        param = params.get(name)
        if param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            return name
    return None


def cache_argument(model) -> str:
    """Name of the KV-cache parameter of ``model.forward``: ``"cache"`` (transformers >= 5.24) or
    ``"past_key_values"`` (older releases).

    Read from the forward's signature and remembered per model class (unless the instance
    overrides ``forward``). A wrapper whose forward only takes ``**kwargs`` (e.g. a PEFT model)
    is looked through via its ``get_base_model()``.

    Raises:
        TypeError: the forward takes neither name.
    """
    cls = type(model)
    own_forward = "forward" in getattr(model, "__dict__", {})
    if not own_forward and cls in _by_class:
        return _by_class[cls]
    forward = getattr(model, "forward", None)
    name = _from_signature(forward) if forward is not None else None
    if name is None:
        base = getattr(model, "get_base_model", None)
        inner = base() if callable(base) else None
        if inner is not None and inner is not model:
            name = cache_argument(inner)
    if name is None:
        raise TypeError(
            f"{cls.__name__}.forward takes no KV-cache argument (looked for {' or '.join(CACHE_ARGUMENTS)}); "
            "moespec needs a transformers causal LM whose forward accepts a cache"
        )
    if not own_forward:
        _by_class[cls] = name
    return name


def forward_kwargs(model, cache, /, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` plus ``cache`` under the name ``model.forward`` expects (see `cache_argument`).

    Returns:
        a new dict, e.g. ``{"cache": cache, **kwargs}`` on transformers >= 5.24 and
        ``{"past_key_values": cache, **kwargs}`` before; spread it into the call.

    Raises:
        TypeError: ``kwargs`` already holds a cache argument, or the forward takes none.
    """
    clash = [n for n in CACHE_ARGUMENTS if n in kwargs]
    if clash:
        raise TypeError(f"pass the cache as forward_kwargs' `cache` argument, not as {clash[0]}=")
    return {cache_argument(model): cache, **kwargs}


def output_cache(output) -> Any:
    """The KV cache carried by a model output (``output.cache`` on transformers >= 5.24,
    ``output.past_key_values`` before), or None when it carries none.

    Reads only a field the output really has, never the deprecated ``past_key_values``
    compatibility property of newer outputs. Accepts a ``ModelOutput`` (a dataclass), a plain
    mapping, or any object holding one of the two as an instance attribute.
    """
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        names = {f.name for f in dataclasses.fields(output)}
        for name in CACHE_ARGUMENTS:
            if name in names:
                return getattr(output, name)
        return None
    if isinstance(output, Mapping):
        for name in CACHE_ARGUMENTS:
            if name in output:
                return output[name]
        return None
    state = getattr(output, "__dict__", {})
    for name in CACHE_ARGUMENTS:
        if name in state:
            return state[name]
    return None
