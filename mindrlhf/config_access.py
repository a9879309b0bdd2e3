"""Reading a model config the same way whatever its type: the run YAML's model_config (a MindFormerConfig, a
dict) has .get, MindFormers' LlamaConfig only attributes. A low layer, so that models/ and training/ both use it."""
from typing import Any, Callable


def config_getter(config) -> Callable[..., Any]:
    """get(key, default=None) reading `config` by .get when it has one, else by attribute."""
    if hasattr(config, "get"):
        return config.get
    return lambda key, default=None: getattr(config, key, default)
