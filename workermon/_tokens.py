"""A model's own tokenizer, found through its card, for ``prefix_overlap(prompt=…)`` and ``strategy="kv"``.

The card names its files (``tokenizer.hf_tokenizer_json`` and
``prompt_formatter.hf_tokenizer_config_json``: path and checksum).  Where
those paths are readable on this host they are loaded with HF ``tokenizers``
(and the chat template rendered with ``jinja2``, ``add_generation_prompt``),
giving the frontend's own token ids; elsewhere the error names the file and
says to pass ``tokenizer=`` (a ``tokenizer.json`` path, its directory, or a
loaded ``tokenizers.Tokenizer``) or ``tokens=``.  Loaded files are cached by
(path, checksum), a few models at most.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["Prompt", "TokenizerUnavailable", "Tokenizers", "load_tokenizer"]

# A completion's text, or a chat request's messages ([{"role": …, "content": …}, …]).
Prompt = Union[str, Sequence[Dict[str, Any]]]


class TokenizerUnavailable(RuntimeError):
    """The model's tokenizer files (named by its card) are not readable here."""


class _Loaded:
    def __init__(self, tokenizer: Any, template: Optional[Any], specials: Dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.specials = specials


def load_tokenizer(path: str) -> Any:
    """A model's HF tokenizer (``tokenizers.Tokenizer``) from its ``tokenizer.json``, or from the model
    directory holding it.  ImportError naming the extra when ``tokenizers`` is missing;
    FileNotFoundError naming the path when there is no such file."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("prompt= needs HF tokenizers: pip install 'workermon[kv]'") from None
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file at {path} (a model's tokenizer.json, or its directory)")
    return Tokenizer.from_file(path)


def _template(config_path: Optional[str]) -> Tuple[Optional[Any], Dict[str, str]]:
    if config_path is None or not os.path.isfile(config_path):
        return None, {}
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    specials = {k: v if isinstance(v, str) else (v or {}).get("content", "") for k, v in cfg.items()
                if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v is not None}
    text = cfg.get("chat_template")
    if isinstance(text, list):  # named templates: the default one
        text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(text, str):
        return None, specials
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat prompts need jinja2: pip install 'workermon[kv]'") from None

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text), specials


class Tokenizers:
    """Tokenizers by card file, loaded once each (thread-safe)."""

    def __init__(self, max_models: int = 8) -> None:
        self._lock = threading.Lock()
        self._loaded: "OrderedDict[Tuple[Any, ...], _Loaded]" = OrderedDict()
        self._max = max_models

    def _get(self, card: Any, model: Optional[str], tokenizer: Any) -> _Loaded:
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            cfg = card.tokenizer_config_file[0] if card is not None and card.tokenizer_config_file else None
            return _Loaded(tokenizer, *_template(cfg if cfg and os.path.isfile(cfg) else None))
        if tokenizer is not None:
            path = os.fspath(tokenizer)
            cfg_path = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else None
            key: Tuple[Any, ...] = ("given", path)
        else:
            ref = card.tokenizer_file if card is not None else None
            if ref is None:
                raise TokenizerUnavailable(f"the card of model {model!r} names no tokenizer file: pass tokens=… "
                                           "(token ids) or tokenizer=… (a tokenizer.json path or a "
                                           "tokenizers.Tokenizer)")
            path = ref[0]
            if not os.path.isfile(path):
                raise TokenizerUnavailable(
                    f"the tokenizer of model {model!r} is {path} (from its card, {ref[1] or 'no checksum'}), "
                    "which is not readable on this host: pass tokenizer=… (that file, or its directory, copied "
                    "here; or a loaded tokenizers.Tokenizer) or tokens=… (token ids)")
            cfg_ref = card.tokenizer_config_file
            cfg_path = cfg_ref[0] if cfg_ref else None
            key = ("card", path, ref[1])
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
                return loaded
        loaded = _Loaded(load_tokenizer(path), *_template(cfg_path))
        with self._lock:
            self._loaded[key] = loaded
            while len(self._loaded) > self._max:
                self._loaded.popitem(last=False)
        return loaded

    def encode(self, prompt: Prompt, card: Any = None, model: Optional[str] = None, tokenizer: Any = None
               ) -> List[int]:
        """Token ids of a completion's text, or of chat messages rendered through the model's template."""
        loaded = self._get(card, model, tokenizer)
        if isinstance(prompt, str):
            text = prompt
        else:
            if loaded.template is None:
                raise TokenizerUnavailable(f"model {model!r} has no chat template readable here (its "
                                           "tokenizer_config.json): pass the rendered text or tokens=…")
            text = loaded.template.render(messages=list(prompt), add_generation_prompt=True, **loaded.specials)
        return list(loaded.tokenizer.encode(text, add_special_tokens=False).ids)
