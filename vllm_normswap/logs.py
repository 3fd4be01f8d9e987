"""The plugin's loggers sit under vLLM's, so their lines show up in a server's log like vLLM's own.

vLLM 0.32's logging config (``vllm/logger.py``: ``DEFAULT_LOGGING_CONFIG``, applied by
``_configure_vllm_root_logger`` through ``configure_logging`` when an engine or server starts, unless
``VLLM_CONFIGURE_LOGGING=0``) gives a handler, a level (``VLLM_LOGGING_LEVEL``), a format and a stream
(``VLLM_LOGGING_STREAM``) to the ``"vllm"`` logger only, with ``propagate=False``. A logger named
``vllm_normswap.*`` sits under the root logger instead, which has no handler: its INFO lines were lost and its
warnings went out through ``logging.lastResort``, unformatted. Named ``vllm.plugins.<module>``, a plugin logger
inherits whatever vLLM configured for ``"vllm"``, including a user's ``VLLM_LOGGING_CONFIG_PATH`` and
``VLLM_CONFIGURE_LOGGING=0`` (then it propagates to the root logger like vLLM's own).

Only for modules that run inside vLLM (model/, quant/, observe/, runtime/exit_code.py): CLI commands write their messages
to stderr and keep stdout for their JSON.
"""

from __future__ import annotations

PREFIX = "vllm.plugins."


def plugin_logger(module_name: str):
    """``plugin_logger(__name__)``: vLLM's ``init_logger`` (with ``info_once`` / ``warning_once``) under "vllm"."""
    from vllm.logger import init_logger

    return init_logger(PREFIX + module_name)
