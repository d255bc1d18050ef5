"""The one exception every user-facing failure of `methods` raises."""


class MethodError(ValueError):
    """Bad user input to a method (unknown name or option, bad ratio, incompatible model)."""
