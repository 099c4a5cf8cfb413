"""The served model: the one the stages score with (its manifest, its backend and why that artifact), its
generation (reloads since the start), and the reload that swaps another in."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from appliance.config import Config
from appliance.domain.errors import ApplianceError, ConfigError
from appliance.domain.faults import Faults
from appliance.domain.manifest import load_manifest
from appliance.inference.loader import Served, open_served
from appliance.scoring.stages import ScoringStages

log = logging.getLogger(__name__)

# Told of the model served first (previous None) and of each one a reload swaps in: the metrics show it.
OnServing = Callable[[Served | None, Served], None]


@dataclass(frozen=True)
class Reload:
    """What a reload did: whether the new model serves now, and the sentence that says so or why not."""

    reloaded: bool
    message: str
    under_way: bool = False  # refused because another reload is under way (nothing was loaded)


class ServedModel:
    """The model the daemon serves: ``current`` (a reload's swap is the only change), ``generation``."""

    def __init__(self, config: Config, on_serving: OnServing | None = None, faults: Faults | None = None) -> None:
        """Open the configured model, self-checked; loading also runs one warm-up inference, so the first
        real image is not the slow one."""
        self._config = config
        self._on_serving: OnServing = on_serving or (lambda previous, now: None)
        self._reloading = threading.Lock()
        self._faults = faults  # told when a remote backend's local fallback serves
        self.current: Served = open_served(
            load_manifest(config.model.dir), config.inference, config.model.engines_dir, faults
        )
        self.generation = 0
        self._on_serving(None, self.current)

    def reload(self, stages: ScoringStages) -> Reload:
        """Load the configured model again beside the one serving (self-checked and warmed up by the
        loader), then swap it into ``stages`` between batches. A model that fails is refused; the old one
        serves on."""
        if not self._reloading.acquire(blocking=False):
            return Reload(False, "A reload is under way already.", under_way=True)
        try:
            message = self._reload(stages)
            log.info("%s", message)
            return Reload(True, message)
        except ApplianceError as e:
            message = f"The new model was refused and the one loaded before serves on: {e.message}"
            log.error("%s", message)
            return Reload(False, message)
        finally:
            self._reloading.release()

    def close(self) -> None:
        self.current.backend.close()

    def _reload(self, stages: ScoringStages) -> str:
        config = self._config
        log.info("reloading the model from %s", config.model.dir)
        loaded = load_manifest(config.model.dir)
        previous = self.current
        old, new = previous.manifest, loaded.manifest
        if (new.input, new.preprocess) != (old.input, old.preprocess):
            # The decode workers prepare images for the model they were started with.
            raise ConfigError(
                "its input or preprocessing differs from the serving model's; restart the service to switch to it."
            )
        served = open_served(loaded, config.inference, config.model.engines_dir, self._faults)
        if not stages.swap_model(new, served.backend):
            served.backend.close()
            raise ConfigError("the scoring stage did not take the new model within its time limit.")
        self.current = served
        self.generation += 1
        self._on_serving(previous, served)
        heatmaps = served.backend.has_heatmap
        if config.pacs.enabled and config.pacs.overlays and heatmaps != previous.backend.has_heatmap:
            # The decode workers keep the frames overlays are drawn on only if they were started for them.
            log.warning(
                "the reloaded model %s heatmaps: the PACS gets heatmap overlays %s after a restart",
                "gives" if heatmaps else "gives no",
                "too" if heatmaps else "no longer",
            )
        return (
            f"reloaded: model {new.model.name} {new.model.version} on {served.backend.name} {served.precision} "
            f"(generation {self.generation}; was {old.model.name} {old.model.version})"
        )
