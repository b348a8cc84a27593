"""Cascade warm start: what the controller learned, kept across `generate` calls.

A `CascadeState` maps a key -- the target, the drafter, the device, the dtype, the draft shape and the
controller's candidates -- to a `CascadeController.state_dict()`. `moespec.speculative.generate` reads
the entry of its key before a request and writes it back after, so a stream of requests on the same
setup behaves like one long request: it starts at the last decided point instead of a fresh test
phase. Different models never share an entry (the key holds a fingerprint of their weights).

- pass ``cascade_state=CascadeState()`` to keep a state yourself; ``save(path)`` / ``CascadeState.load(path)``
  write and read it as JSON;
- by default (``cascade_state=None``) `generate` uses the process-wide `default_cascade_state()`, except
  under a cost model or a replaced clock, whose times are not the device's (then each call starts cold);
- ``cascade_state=False``: a cold controller per call.
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from .stats import jsonable

__all__ = ["CascadeState", "default_cascade_state", "set_default_cascade_state", "cascade_key",
           "model_fingerprint", "STATE_FORMAT", "STATE_FILE_VERSION"]

STATE_FORMAT = "moespec.cascade_state"
STATE_FILE_VERSION = 1


# model -> (signature, fingerprint): the hash is computed once per model and weights version, since
# generate asks for it on every call of a stream (hashing the config costs about a millisecond).
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_fingerprint(model) -> str:
    """A short hash of a model's class, config and a sample of its weights.

    Two models with the same architecture but other weights (another checkpoint, another seed) get
    other fingerprints; the same weights get the same one in every process.
    """
    params = list(model.parameters())
    sample = (params[0], params[len(params) // 2], params[-1]) if params else ()
    # In-place weight updates (load_state_dict, training) bump a tensor's _version; dtype/device moves
    # replace the tensor. Either changes the signature and the fingerprint is recomputed.
    sig = (len(params), tuple((id(p), p._version, p.data_ptr(), p.dtype, str(p.device)) for p in sample))
    try:
        cached = _FINGERPRINTS.get(model)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == sig:
        return cached[1]
    h = hashlib.sha1(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    h.update(str(sum(p.numel() for p in params)).encode())
    # A few values of the first, middle and last tensors: cheap, and enough to tell weights apart.
    for p in sample:
        h.update(p.detach().reshape(-1)[:32].to("cpu", torch.float32).numpy().tobytes())
    fp = h.hexdigest()[:16]
    try:
        _FINGERPRINTS[model] = (sig, fp)
    except TypeError:
        pass
    return fp


def _drafter_fingerprint(drafter) -> dict:
    from .drafters import DraftModelDrafter, PromptLookupDrafter

    name = type(drafter).__name__
    if isinstance(drafter, DraftModelDrafter):
        return {"kind": name, "model": model_fingerprint(drafter.model), "temperature": drafter.temperature}
    if isinstance(drafter, PromptLookupDrafter):
        return {"kind": name, "max_ngram": drafter.max_ngram, "min_ngram": drafter.min_ngram,
                "num_tokens": drafter.num_tokens}
    custom = getattr(drafter, "state_key", None)  # a drafter may say what distinguishes its instances
    return {"kind": f"{type(drafter).__module__}.{type(drafter).__qualname__}",
            "key": jsonable(custom() if callable(custom) else custom)}


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        # Thread count changes the cost of an iteration several-fold on small models.
        return f"cpu: {torch.get_num_threads()} threads"
    return device.type


def cascade_key(model, drafter, draft: dict, controller, budget_rule: Optional[dict] = None) -> dict:
    """The key of a setup: target and drafter fingerprints, device, dtype, draft shape, controller candidates,
    and how a budget is applied (``budget_rule``: policy and candidate set, which change a budget's cost
    and acceptance)."""
    p = next(model.parameters())
    return {
        "budget_rule": dict(budget_rule or {}),
        "target": model_fingerprint(model),
        "target_name": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "drafter": _drafter_fingerprint(drafter),
        "device": _device_label(p.device),
        "dtype": str(p.dtype).replace("torch.", ""),
        "draft": dict(draft),
        "k_max": controller.k_max,
        "budgets": jsonable(list(controller.budgets)),
    }


def _key_str(key: dict) -> str:
    return json.dumps(jsonable(key), sort_keys=True)


class CascadeState:
    """Cascade controller states per setup key; passed to `generate` as ``cascade_state=``.

    max_entries: setups kept (least recently used dropped first).
    """

    def __init__(self, max_entries: int = 64):
        if int(max_entries) < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[str, dict] = OrderedDict()  # key string -> {"key", "requests", "controller"}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: dict) -> bool:
        return _key_str(key) in self._entries

    def __repr__(self) -> str:
        return f"CascadeState({len(self)} setup{'s' if len(self) != 1 else ''})"

    def keys(self) -> list[dict]:
        """The setup keys held, least recently used first."""
        return [e["key"] for e in self._entries.values()]

    def get(self, key: dict) -> dict | None:
        """The controller state stored for `key` (None if none)."""
        e = self._entries.get(_key_str(key))
        return None if e is None else e["controller"]

    def requests(self, key: dict) -> int:
        """How many requests have updated the entry of `key`."""
        e = self._entries.get(_key_str(key))
        return 0 if e is None else e["requests"]

    def put(self, key: dict, controller_state: dict) -> None:
        """Store a controller's `state_dict()` under `key`."""
        s = _key_str(key)
        old = self._entries.pop(s, None)
        self._entries[s] = {"key": jsonable(key), "requests": (old["requests"] if old else 0) + 1,
                            "controller": controller_state}
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: dict | None = None) -> None:
        """Drop the entry of `key`, or every entry when `key` is None."""
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(_key_str(key), None)

    def restore(self, key: dict, controller) -> bool:
        """Continue `controller` from the entry of `key`; False (controller untouched) when there is none."""
        st = self.get(key)
        if st is None:
            return False
        controller.load_state_dict(st)
        return True

    # --- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_FILE_VERSION, "max_entries": self.max_entries,
                "entries": [dict(e) for e in self._entries.values()]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "the state") -> "CascadeState":
        """The inverse of `to_dict`; `ValueError` naming `source` for another format or version."""
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"{source} is not a moespec Cascade state (expected a JSON object with "
                             f"\"format\": \"{STATE_FORMAT}\")")
        if data.get("version") != STATE_FILE_VERSION:
            raise ValueError(f"{source} is a Cascade state of version {data.get('version')!r}; this moespec reads "
                             f"version {STATE_FILE_VERSION} (delete the file to start cold)")
        from .cascade import STATE_VERSION

        out = cls(max_entries=int(data.get("max_entries", 64)))
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise ValueError(f"{source}: 'entries' must be a list")
        for i, e in enumerate(entries):
            if not (isinstance(e, dict) and isinstance(e.get("key"), dict) and isinstance(e.get("controller"), dict)):
                raise ValueError(f"{source}: entry {i} needs a 'key' object and a 'controller' object")
            if e["controller"].get("version") != STATE_VERSION:
                raise ValueError(f"{source}: entry {i} holds a controller state of version "
                                 f"{e['controller'].get('version')!r}; this moespec reads version {STATE_VERSION}")
            out._entries[_key_str(e["key"])] = {"key": e["key"], "requests": int(e.get("requests", 0)),
                                                "controller": e["controller"]}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state as JSON (the folder is created; written to a temporary file, then renamed)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CascadeState":
        """Read a state written by `save`; `ValueError` for a file that is not one."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"Cascade state file {p} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"Cascade state file {p} is not JSON ({exc})") from None
        return cls.from_dict(data, source=f"Cascade state file {p}")


_default = CascadeState()


def default_cascade_state() -> CascadeState:
    """The process-wide state `generate` uses when given ``cascade_state=None`` (and no cost model)."""
    return _default


def set_default_cascade_state(state: CascadeState | None) -> CascadeState:
    """Replace the process-wide state (None: a new empty one); returns the new default."""
    global _default
    if state is not None and not isinstance(state, CascadeState):
        raise TypeError(f"expected a CascadeState or None, got {type(state).__name__}")
    _default = state if state is not None else CascadeState()
    return _default


def resolve_state(cascade_state, controller, built_here: bool, device_clock: bool) -> CascadeState | None:
    """The state `generate` uses for `controller` (None: a cold controller for this call).

    cascade_state: a `CascadeState`; True (the process-wide default); False (none); None (the default
    when the controller was built from a name and the times are the device's: no cost model, no
    replaced clock). Only `CascadeController` s use a state.
    """
    from .cascade import CascadeController

    if cascade_state is not None and not isinstance(cascade_state, (bool, CascadeState)):
        raise TypeError(f"cascade_state must be a CascadeState, True, False or None, got "
                        f"{type(cascade_state).__name__}")
    if not isinstance(controller, CascadeController) or cascade_state is False:
        return None
    if isinstance(cascade_state, CascadeState):
        return cascade_state
    if cascade_state is True or (built_here and device_clock):
        return default_cascade_state()
    return None
