"""A build problem the user can act on: one sentence, a non-zero exit, nothing half-written left behind."""


class BuildError(Exception):
    """Stops the build; the message is printed as is."""


class GateFailed(BuildError):
    """An explicitly requested precision fell outside the manifest's tolerance."""
