"""m4's version, in a module of its own: the exporter and the calibrator record it in the
bundles they write without importing the package's API."""

__version__ = "0.1.0"
