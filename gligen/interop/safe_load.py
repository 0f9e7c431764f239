"""Reading official GLIGEN files without unpickling code: `torch.load(weights_only=True)` with inert stand-ins for
the OmegaConf classes its `config_dict` was pickled with, and the checks of the file's layout."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

log = logging.getLogger(__name__)

class InteropError(ValueError):
    """A checkpoint or model that cannot be converted; the message says what was expected and what was found."""


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


OFFICIAL_WEIGHT_PARTS = ("model", "autoencoder", "text_encoder", "diffusion")
OFFICIAL_PARTS = (*OFFICIAL_WEIGHT_PARTS, "config_dict")

# ----- reading official files without unpickling code ---------------------------------------------------------
# The official trainer saves `config_dict = vars(config)` for an OmegaConf DictConfig `config`: a plain dict
# {"_metadata": ContainerMetadata, "_parent": None, "_content": {name: DictConfig | ListConfig | AnyNode, ...}}
# (official inference reads `saved_ckpt["config_dict"]["_content"]`). OmegaConf objects pickle as NEWOBJ (empty
# instance of the class) + BUILD (their `__dict__` / `__getstate__()` dict). torch's weights_only unpickler runs
# NEWOBJ / BUILD only for allow-listed classes and then calls `__setstate__`, so allow-listing the OmegaConf *names*
# mapped to the inert classes below rebuilds the config as data: no OmegaConf code runs, omegaconf is never
# imported, and every other global is still refused by torch.


class _OmegaConfObject:
    """Inert stand-in for an OmegaConf class in a pickle: keeps the pickled state dict, runs nothing."""

    def __init__(self):  # never called by the unpickler (NEWOBJ uses __new__), here for completeness
        self.state = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state), as pickle's BUILD allows
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state {type(state).__name__} of {self.omegaconf_name}")
        self.state = state

    def __repr__(self):
        return f"<{self.omegaconf_name} stand-in>"


class _DictConfig(_OmegaConfObject):
    omegaconf_name = "omegaconf.dictconfig.DictConfig"


class _ListConfig(_OmegaConfObject):
    omegaconf_name = "omegaconf.listconfig.ListConfig"


class _ValueNode(_OmegaConfObject):
    omegaconf_name = "omegaconf.nodes.ValueNode"


class _Metadata(_OmegaConfObject):
    omegaconf_name = "omegaconf.base.Metadata"


class _Marker:
    """A global that only appears as a value (OmegaConf metadata's `ref_type=typing.Any`, `object_type=dict`,
    `key_type=int`); not a class, and calling it (REDUCE) refuses the file, so nothing is constructed with it."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"the file calls {self.name}: allowed only as a value in OmegaConf metadata")

    def __repr__(self):
        return self.name


def _defaultdict_as_dict(default_factory=None):
    """OmegaConf 2.0 metadata holds `resolver_cache = defaultdict(dict)`: rebuilt as a plain dict."""
    return {}


_NODE_CLASSES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode")
OMEGACONF_STAND_INS = [
    (_DictConfig, "omegaconf.dictconfig.DictConfig"),
    (_ListConfig, "omegaconf.listconfig.ListConfig"),
    (_Metadata, "omegaconf.base.Metadata"),
    (_Metadata, "omegaconf.base.ContainerMetadata"),
    *[(_ValueNode, f"omegaconf.nodes.{name}") for name in _NODE_CLASSES],
    (_Marker("typing.Any"), "typing.Any"),
    # metadata types: object_type dict / list, key_type int (ListConfig) or str, typed value nodes' ref_type
    *[(_Marker(f"builtins.{name}"), f"builtins.{name}") for name in ("dict", "list", "int", "str", "float", "bool")],
    (_defaultdict_as_dict, "collections.defaultdict"),
]

UNSAFE_FILE_HELP = """\
torch.load(..., weights_only=True) refused the file: it contains a pickled Python object other than tensors and
the OmegaConf config containers official GLIGEN checkpoints hold (OmegaConf's DictConfig, ListConfig, value nodes
and metadata are read through inert stand-ins). This converter never unpickles arbitrary objects (unpickling can
run code). If the file is an official GLIGEN checkpoint you trust, strip the offending entry in a throwaway
container: load it there with pickling allowed (torch's weights_only=False runs whatever the file contains), set
the offending entry (e.g. "config_dict") to None, torch.save it, then run from-official on the stripped file.
torch said: """


def _plain_config(value):
    """OmegaConf stand-ins -> plain dicts / lists / values. `_parent` back-references are dropped (no cycles)."""
    if isinstance(value, _DictConfig):
        content = value.state.get("_content")
        return _plain_config(content)  # None, "???" (missing) or an interpolation string stay as they are
    if isinstance(value, _ListConfig):
        return _plain_config(value.state.get("_content"))
    if isinstance(value, _ValueNode):
        return _plain_config(value.state.get("_val"))
    if isinstance(value, dict):
        if "_content" in value and "_metadata" in value:  # vars(DictConfig), how the official trainer saves it
            return _plain_config(value["_content"])
        return {k: _plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_config(v) for v in value]
    if isinstance(value, (_Metadata, _Marker)):
        return None
    return value


def load_official(path: str | Path) -> dict:
    """Read an official GLIGEN checkpoint without unpickling code, and check its layout.

    `config_dict` comes back as plain dicts (or None when the file has none); see `OMEGACONF_STAND_INS`."""
    try:
        with torch.serialization.safe_globals(OMEGACONF_STAND_INS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, TypeError) as error:  # TypeError: a stand-in used as a class it is not
        # keep torch's one useful line: which global (class) it refused
        lines = [line.strip() for line in str(error).splitlines()]
        detail = [line for line in lines if "Unsupported global" in line or "Trying to" in line] or [str(error)]
        raise InteropError(f"{path}: {UNSAFE_FILE_HELP}{detail[0]}") from None
    checkpoint = check_official_layout(checkpoint, str(path))
    if "config_dict" in checkpoint:
        checkpoint["config_dict"] = _plain_config(checkpoint["config_dict"])
    return checkpoint


# top-level entries of the official trainer's snapshots besides the weights (iteration, optimizer, LR schedule,
# EMA copy of the model)
OFFICIAL_TRAINER_KEYS = ("iters", "opt", "scheduler", "ema")


def check_official_layout(checkpoint, name: str = "checkpoint") -> dict:
    if not isinstance(checkpoint, dict):
        raise InteropError(
            f"{name}: expected an official GLIGEN checkpoint (a dict with {list(OFFICIAL_PARTS)}), "
            f"found a {type(checkpoint).__name__}"
        )
    missing = [k for k in OFFICIAL_WEIGHT_PARTS if k not in checkpoint]
    if missing:
        hint = ""
        if "state_dict" in checkpoint and "hyper_parameters" in checkpoint:
            hint = " (this looks like a Lightning / GLIGENModule checkpoint: it needs no import)"
        elif "state_dict" in checkpoint:
            hint = " (this looks like a plain Stable Diffusion checkpoint without GLIGEN layers)"
        raise InteropError(
            f"{name}: expected an official GLIGEN checkpoint with keys {list(OFFICIAL_PARTS)}; found keys "
            f"{sorted(map(str, checkpoint))}, missing {missing}{hint}"
        )
    for part in OFFICIAL_WEIGHT_PARTS:
        value = checkpoint[part]
        if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
            raise InteropError(
                f"{name}: '{part}' should be a state dict (name -> tensor), found {type(value).__name__}"
            )
    # released files have exactly these parts; the official trainer's snapshots add its training state, which
    # official inference ignores too (it loads 'model'): ignored here, and named
    extra = sorted(set(map(str, checkpoint)) - set(OFFICIAL_PARTS) - set(OFFICIAL_TRAINER_KEYS))
    if extra:
        raise InteropError(f"{name}: unexpected top-level keys {extra}; expected only {list(OFFICIAL_PARTS)} "
                           f"(and the trainer's {list(OFFICIAL_TRAINER_KEYS)})")
    ignored = [k for k in OFFICIAL_TRAINER_KEYS if k in checkpoint]
    if ignored:
        log.warning("%s: ignoring the official trainer's %s (training state; the weights imported are 'model')",
                    name, ignored)
    return {k: v for k, v in checkpoint.items() if k not in OFFICIAL_TRAINER_KEYS}
