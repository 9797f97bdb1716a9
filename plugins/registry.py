"""Find format plugins through the ``bitserve.formats`` entry-point group."""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import entry_points
from typing import Collection, Mapping

from bitserve.plugins.base import FormatPlugin
from bitserve.plugins.checkpoint import CheckpointReader

ENTRY_POINT_GROUP = "bitserve.formats"

log = logging.getLogger(__name__)


class UnknownFormatError(ValueError):
    """No installed plugin has the requested name or claims the checkpoint."""


class PluginError(ValueError):
    """A format plugin failed where bitserve called it (the message names the plugin)."""


def is_builtin(cls: type) -> bool:
    return cls.__module__.startswith("bitserve.")


def _plugin_label(cls: type) -> str:
    return f"'{cls.name}' ({cls.__module__}.{cls.__qualname__})"


class FormatRegistry:
    """The installed format plugins, by name.

    Built from entry points by default; tests may pass plugin classes directly.
    """

    def __init__(self, plugins: Mapping[str, type[FormatPlugin]] | None = None):
        self._unusable: dict[str, str] = {}  # entry point name -> why it was skipped (for --format NAME)
        if plugins is None:
            plugins = self._from_entry_points(self._unusable)
        self._plugins = dict(plugins)

    @staticmethod
    def _from_entry_points(unusable: dict[str, str]) -> dict[str, type[FormatPlugin]]:
        """Plugins by their class's ``name`` (what users pass as --format and what is reported;
        the entry point's own name only when the class sets none). ``unusable`` gets the entry
        points that failed to import, by name."""
        found: dict[str, type[FormatPlugin]] = {}
        origin = {}  # name -> the entry point it came from
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
            except Exception as e:  # a broken third-party plugin must not break loading
                log.warning("format plugin %r (%s) failed to import: %s", ep.name, ep.value, e)
                unusable[ep.name] = f"failed to import ({ep.value}): {type(e).__name__}: {e}"
                continue
            if not (isinstance(cls, type) and issubclass(cls, FormatPlugin)):
                log.warning("entry point %r (%s) is not a FormatPlugin subclass; ignored", ep.name, ep.value)
                continue
            if inspect.isabstract(cls):
                log.warning("format plugin %r (%s) does not implement %s; ignored", ep.name, ep.value,
                            ", ".join(sorted(cls.__abstractmethods__)))
                continue
            name = cls.name or ep.name
            if name != ep.name:
                log.warning("format plugin entry point %r (%s) names its format %r: use --format %s", ep.name,
                            ep.value, name, name)
            if name in found:
                (kept, kept_ep), (dropped, dropped_ep) = (found[name], origin[name]), (cls, ep)
                if is_builtin(cls) and not is_builtin(kept):  # a built-in format keeps its name
                    (kept, kept_ep), (dropped, dropped_ep) = (dropped, dropped_ep), (kept, kept_ep)
                if kept is not dropped:  # (the same distribution seen twice on sys.path is fine)
                    log.warning("format %r of entry point %r (%s) is already provided by %s.%s; ignored", name,
                                dropped_ep.name, dropped_ep.value, kept.__module__, kept.__qualname__)
                found[name], origin[name] = kept, kept_ep
                continue
            found[name], origin[name] = cls, ep
        return found

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def _installed(self) -> str:
        return ", ".join(self.names()) or "(none)"

    def get(self, name: str, config: dict | None = None) -> FormatPlugin:
        cls = self._plugins.get(name)
        if cls is None and name in self._unusable:
            raise UnknownFormatError(f"format plugin '{name}' is installed but {self._unusable[name]}; "
                                     f"usable formats: {self._installed()}")
        if cls is None:
            raise UnknownFormatError(f"unknown format '{name}'; installed formats: {self._installed()}")
        try:
            return cls(config)
        except Exception as e:
            if is_builtin(cls):
                raise
            raise PluginError(f"format plugin {_plugin_label(cls)} failed to start: {type(e).__name__}: {e}") from e

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> FormatPlugin:
        """The highest-priority plugin that claims the checkpoint."""
        ordered = sorted(self._plugins.items(), key=lambda kv: (-kv[1].priority, kv[0]))
        for _, cls in ordered:
            if is_builtin(cls):
                plugin = cls(config)
                if plugin.detect(config, tensor_names, reader):
                    return plugin
                continue
            try:  # a broken third-party plugin must not stop the others from claiming the checkpoint
                plugin = cls(config)
                claimed = plugin.detect(config, tensor_names, reader)
            except Exception as e:
                log.warning("format plugin %s failed in detect (%s: %s); skipped", _plugin_label(cls),
                            type(e).__name__, e)
                continue
            if claimed:
                return plugin
        raise UnknownFormatError(
            f"{reader.folder}: no installed format recognises this checkpoint "
            f"(quantization_config={config.get('quantization_config')!r}); installed formats: "
            f"{self._installed()}. Pass format=NAME to force one."
        )
