"""Tables and figures, read back from run directories only."""
