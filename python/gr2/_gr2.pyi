"""Type stubs of the native module gr2._gr2 (rust/src/py)."""

__version__: str
