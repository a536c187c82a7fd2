"""Tables and figures, read back from run directories only."""

from ..errors import extra

with extra("plot"):  # what this package's modules import; checked once, here
    import matplotlib  # noqa: F401
    import numpy  # noqa: F401
    import scipy  # noqa: F401
